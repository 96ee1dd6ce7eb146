// Torch-side helpers shared by the CPU kernel (centroid_align.cpp) and the CUDA
// binding (centroid_align_cuda.cpp). Kernel code never includes this file.
#pragma once

#include <ATen/ATen.h>

namespace dmfn_fast {

constexpr double kEps = 1e-7;  // added to every element by the reference

// How a feature map is walked: rows of unit-stride pixels (NCHW-like), or
// pixels of unit-stride channels (channels-last-like).
enum class Walk { Planes, Channels };

inline Walk pick_walk(const at::Tensor& f) {
  if (f.stride(3) == 1 || f.size(3) == 1) return Walk::Planes;
  if (f.stride(1) == 1 || f.size(1) == 1) return Walk::Channels;
  return Walk::Planes;  // caller makes such a map contiguous first
}

// Any other layout is copied once to NCHW; the two walks cover all the rest.
inline at::Tensor walkable(const at::Tensor& f) {
  if (f.stride(3) == 1 || f.size(3) == 1 || f.stride(1) == 1 || f.size(1) == 1) return f;
  return f.contiguous();
}

inline void check_fwd_inputs(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 4, "centroid_align: feature maps must be [N, C, H, W], got ", a.sizes());
  TORCH_CHECK(a.sizes() == b.sizes(), "centroid_align: feature maps differ in shape: ", a.sizes(), " vs ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "centroid_align: feature maps differ in dtype: ",
              a.scalar_type(), " vs ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "centroid_align: feature maps on different devices: ", a.device(),
              " vs ", b.device());
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "centroid_align: dtype must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(a.numel() > 0, "centroid_align: empty feature maps, shape ", a.sizes());
}

// The CUDA forward's launch plan, the op's `plan` argument: -1 reads the plan switches from the
// environment, per call; 0..15 is the plan a GPU run measured (dmfn_fast/ops/centroid_align.py's MEASURED_PLANS,
// where no switch is set): bits 0-1 waves - 1, bit 2 the finish in blocks, bit 3 whole pixels.
inline void check_plan(int64_t plan) {
  TORCH_CHECK(plan >= -1 && plan < 16, "centroid_align_fwd: plan must be -1 (the environment's switches) or 0 to 15 "
              "(bits 0-1 waves - 1, bit 2 the finish in blocks, bit 3 whole pixels), got ", plan);
}

// Accumulation (and loss, stats) dtype: fp32, or fp64 for fp64 maps.
inline at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// Gradients are written channels-last exactly when the map is a dense
// channels-last tensor; the Python fake kernel mirrors this rule.
inline bool grad_channels_last(const at::Tensor& like) {
  return like.is_contiguous(at::MemoryFormat::ChannelsLast) && !like.is_contiguous();
}

inline void check_bwd_inputs(const at::Tensor& grad, const at::Tensor& stats, const at::Tensor& like,
                             int64_t which) {
  TORCH_CHECK(which == 0 || which == 1, "centroid_align_bwd: which must be 0 (out) or 1 (tgt), got ", which);
  TORCH_CHECK(like.dim() == 4, "centroid_align_bwd: like must be [N, C, H, W]");
  TORCH_CHECK(stats.dim() == 4 && stats.size(0) == 2 && stats.size(1) == like.size(0) &&
                  stats.size(2) == like.size(1) && stats.size(3) == 3,
              "centroid_align_bwd: stats must be [2, N, C, 3] for like ", like.sizes(), ", got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == acc_type(like.scalar_type()), "centroid_align_bwd: stats dtype ",
              stats.scalar_type(), " does not match ", like.scalar_type());
  TORCH_CHECK(grad.numel() == 1, "centroid_align_bwd: grad must be a scalar");
}

}  // namespace dmfn_fast

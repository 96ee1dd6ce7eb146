// Binds the raw-pointer CUDA launchers of centroid_align_kernel.cu to the
// dmfn_fast::centroid_align_{fwd,bwd} ops declared in centroid_align.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "centroid_align.h"
#include "centroid_align_kernel.h"

namespace dmfn_fast {
namespace {

dmfn_fast_cuda::DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return dmfn_fast_cuda::kFloat32;
    case at::kHalf: return dmfn_fast_cuda::kFloat16;
    case at::kBFloat16: return dmfn_fast_cuda::kBFloat16;
    case at::kDouble: return dmfn_fast_cuda::kFloat64;
    default: TORCH_CHECK(false, "centroid_align: unsupported dtype ", st);
  }
}

dmfn_fast_cuda::MapView view_of(const at::Tensor& f) {
  return {f.const_data_ptr(), f.stride(0), f.stride(1), f.stride(2), f.stride(3)};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "centroid_align: ", what, " failed: ", cudaGetErrorString(err));
}

void check_sizes(const at::Tensor& f) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(f.size(2) * f.size(3) <= kMax && f.size(0) * f.size(1) <= kMax && f.size(0) * f.size(2) <= kMax,
              "centroid_align: map too large for the CUDA kernels: ", f.sizes());
}

// A digit from the environment (spaces around it ignored, as dmfn_fast/ops/_impl.py's env_switch, which
// checks these switches at import), one of `allowed`, or `fallback` when unset or blank. Read per call, so a
// benchmark can switch it between calls.
int env_choice(const char* name, const char* allowed, int fallback, const char* what) {
  const char* raw = std::getenv(name);
  std::string v = raw == nullptr ? "" : raw;
  const size_t b = v.find_first_not_of(" \t\n\r\f\v"), e = v.find_last_not_of(" \t\n\r\f\v");
  v = b == std::string::npos ? "" : v.substr(b, e - b + 1);
  if (v.empty()) return fallback;
  TORCH_CHECK(v.size() == 1 && std::strchr(allowed, v[0]) != nullptr, name, " must be one of the digits '", allowed,
              "' (", what, "), got '", raw, "'; unset it for the default ", fallback);
  return v[0] - '0';
}

// The forward's plan, A/B switches that gpu_breakdown.py times (the defaults are what the H200 measured):
// - DMFN_CENTROID_WAVES=1..4: pixel runs sized to fill the SMs that many times (default one wave). The fp32
//   forward read at 2.88 TB/s in one wave (s10): does overlapping one block's tail with the next block's loads
//   win?
// - DMFN_CENTROID_BLOCK_FINISH=1: where each block sums whole planes (one run per column: fp32
//   [16, 512, 32, 32] on 132 SMs), each turns them into stats and a loss share, and a one-block kernel adds
//   the shares, in place of finish_pairs (3.58 us in fp32, s15) with its fence and ticket.
// - DMFN_CENTROID_PIXELS=1: the two-map kernel's blocks take every channel of a run of pixels, where the map
//   has 17 to 256 channel vectors: each block's bytes are contiguous, as a plain stream's. Blocks of 8 vectors
//   read at 2.0 TB/s on the H100 (67% of copy) where a Triton stream read at 2.95 (s18).
// (The folded-finish, async-copy and 32-vector-block switches, never faster on the H200 or the H100, went in s24.)
// plan: -1, the switches above; else the plan a GPU run measured (check_plan in centroid_align.h).
dmfn_fast_cuda::ForwardOptions forward_options(const at::Device& device, int64_t plan) {
  if (plan < 0) {  // the switches, in this order, as a plan's bits (dmfn_fast/ops/centroid_align.py's cpp_plan)
    plan = env_choice("DMFN_CENTROID_WAVES", "1234", 1, "waves of blocks the centroid forward plans") - 1;
    plan |= env_choice("DMFN_CENTROID_BLOCK_FINISH", "01", 0, "1 finishes whole planes in the forward's blocks") << 2;
    plan |= env_choice("DMFN_CENTROID_PIXELS", "01", 0, "1 gives the forward's blocks whole pixels") << 3;
  }
  dmfn_fast_cuda::ForwardOptions o;
  o.sms = at::cuda::getDeviceProperties(device.index())->multiProcessorCount * static_cast<int>((plan & 3) + 1);
  o.block_finish = (plan & 4) != 0;
  o.pixels = (plan & 8) != 0;
  return o;
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& f_out_in, const at::Tensor& f_tgt_in, int64_t plan) {
  check_fwd_inputs(f_out_in, f_tgt_in);
  check_sizes(f_out_in);
  check_plan(plan);
  // The switches first: a refusal before the guard and any allocation (a refusal after them crashed the
  // process on the H200 and the H100, s15 and s18; the input checks above never did).
  const dmfn_fast_cuda::ForwardOptions opt = forward_options(f_out_in.device(), plan);
  const c10::cuda::CUDAGuard guard(f_out_in.device());
  const at::Tensor f_out = walkable(f_out_in), f_tgt = walkable(f_tgt_in);
  const int64_t N = f_out.size(0), C = f_out.size(1);
  const int H = static_cast<int>(f_out.size(2)), W = static_cast<int>(f_out.size(3));
  const auto acc = acc_type(f_out.scalar_type());
  at::Tensor stats = at::empty({2, N, C, 3}, f_out.options().dtype(acc));
  at::Tensor loss = at::empty({}, f_out.options().dtype(acc));
  const auto dt = dtype_of(f_out.scalar_type());
  const dmfn_fast_cuda::MapView a = view_of(f_out), b = view_of(f_tgt);
  const size_t bytes = dmfn_fast_cuda::forward_work_bytes(a, b, dt, N, C, H, W, opt);
  at::Tensor work = at::empty({static_cast<int64_t>(bytes)}, f_out.options().dtype(at::kByte));
  check_launch(dmfn_fast_cuda::launch_forward(a, b, dt, N, C, H, W, opt, stats.data_ptr(), loss.data_ptr(),
                                              work.data_ptr(), at::cuda::getCurrentCUDAStream()),
               "forward");
  return {loss, stats};
}

// DMFN_CENTROID_GRAD_ROWS=1, 2 or 4: image rows per block of the channels-last gradient kernel (default 4),
// an A/B that gpu_breakdown.py times (fewer rows, more blocks in flight).
dmfn_fast_cuda::GradOptions grad_options() {
  dmfn_fast_cuda::GradOptions o;
  o.rows = env_choice("DMFN_CENTROID_GRAD_ROWS", "124", 4, "image rows per block of the centroid gradient");
  return o;
}

at::Tensor bwd_cuda(const at::Tensor& grad, const at::Tensor& stats_in, const at::Tensor& like, int64_t which) {
  check_bwd_inputs(grad, stats_in, like, which);
  check_sizes(like);
  const dmfn_fast_cuda::GradOptions opt = grad_options();  // before the guard, as the forward's
  const c10::cuda::CUDAGuard guard(like.device());
  const bool cl = grad_channels_last(like);
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                           : at::MemoryFormat::Contiguous));
  const at::Tensor stats = stats_in.contiguous();
  const at::Tensor g = grad.to(stats.options()).contiguous();  // stays on the GPU: no sync
  check_launch(dmfn_fast_cuda::launch_grad(g.const_data_ptr(), stats.const_data_ptr(), dtype_of(like.scalar_type()),
                                           like.size(0), like.size(1), static_cast<int>(like.size(2)),
                                           static_cast<int>(like.size(3)), static_cast<int>(which), cl,
                                           out.data_ptr(), at::cuda::getCurrentCUDAStream(), opt),
               "backward");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmfn_fast, CUDA, m) {
  m.impl("centroid_align_fwd", &fwd_cuda);
  m.impl("centroid_align_bwd", &bwd_cuda);
}

}  // namespace dmfn_fast

// Launch functions of centroid_align_kernel.cu: raw pointers, sizes, strides and a
// stream, no torch types, so the kernels compile with plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace dmfn_fast_cuda {

enum DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// A [N, C, H, W] map; strides in elements. Either sW == 1 (or W == 1): walked
// by planes, or sC == 1 (or C == 1): walked by channels.
struct MapView {
  const void* data;
  long long sN, sC, sH, sW;
};

// How the forward plans the two-map kernel (other layouts ignore it).
struct ForwardOptions {
  int sms = 1;        // multiprocessors whose blocks the pixel runs fill once: the card's count times the waves
  // where the plan gives each column of blocks one run (whole planes): each block turns its planes' sums into
  // stats and a loss share, and one block adds the shares (no finish_pairs)
  bool block_finish = false;
  // blocks of every channel vector of a run of pixels (32, or 64, 128 or 256: those take no block finish),
  // where the map has 17 to 256: one column of blocks an image, contiguous bytes
  bool pixels = false;
};

// Scratch bytes launch_forward needs for these maps with these options.
size_t forward_work_bytes(MapView out, MapView tgt, DType dtype, long long N, long long C, int H, int W,
                          const ForwardOptions& opt);

// The forward: stats [2, N, C, 3] = (S0, cx, cy) per (map, n, c), with the reference's 1e-7 per element
// added, and loss = mean over (n, c, {x, y}) of the squared centroid difference, written to *loss. stats
// and loss are float, or double for kFloat64 maps; work holds forward_work_bytes(...) bytes, 16-byte aligned.
cudaError_t launch_forward(MapView out, MapView tgt, DType dtype, long long N, long long C, int H, int W,
                           const ForwardOptions& opt, void* stats, void* loss, void* work, cudaStream_t stream);

// How the gradient kernels are laid out (only the channels-last 16-byte one reads it).
struct GradOptions {
  // image rows per block: fewer make more blocks. s10's H200 wrote the bf16 gradient of [16, 512, 32, 32]
  // (256 blocks of 4 rows) at 2.98 TB/s, the fp32 one (512 blocks) at 3.7
  int rows = 4;
};

// d loss / d map `which` (0 = out, 1 = tgt) for the scalar *grad, into a
// dense NCHW (channels_last = false) or NHWC gradient.
cudaError_t launch_grad(const void* grad, const void* stats, DType dtype, long long N, long long C, int H, int W,
                        int which, bool channels_last, void* out, cudaStream_t stream,
                        const GradOptions& opt = GradOptions());

}  // namespace dmfn_fast_cuda

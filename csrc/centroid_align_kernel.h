// Launch functions of centroid_align_kernel.cu: raw pointers, sizes, strides and a
// stream, no torch types, so the kernels compile with plain nvcc.
#pragma once

#include <cuda_runtime.h>

namespace dmfn_fast_cuda {

enum DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// A [N, C, H, W] map; strides in elements. Either sW == 1 (or W == 1): walked
// by planes, or sC == 1 (or C == 1): walked by channels.
struct MapView {
  const void* data;
  long long sN, sC, sH, sW;
};

// Raw per-(n, c) sums (S0, Sx, Sy) of one map into sums[(n*C + c)*3 + k].
// sums and everything after are float, or double for kFloat64 maps.
cudaError_t launch_map_sums(MapView map, DType dtype, long long N, long long C, int H, int W, void* sums,
                            cudaStream_t stream);

// stats [2, N, C, 3] raw sums -> (S0, cx, cy) in place, with the reference's
// 1e-7 per element added; loss = mean over (n, c, {x, y}) of the squared
// centroid difference, written to *loss.
cudaError_t launch_finish(void* stats, DType dtype, long long NC, int H, int W, void* loss, cudaStream_t stream);

// d loss / d map `which` (0 = out, 1 = tgt) for the scalar *grad, into a
// dense NCHW (channels_last = false) or NHWC gradient.
cudaError_t launch_grad(const void* grad, const void* stats, DType dtype, long long N, long long C, int H, int W,
                        int which, bool channels_last, void* out, cudaStream_t stream);

}  // namespace dmfn_fast_cuda

// CUDA kernels of the centroid alignment loss. Only CUDA headers here, so CI
// compile-checks this file with plain nvcc (no spills, no local memory).
//
// Forward: raw sums S0, Sx, Sy per (n, c) in fp32 (fp64 for fp64) with u, v made
// from the pixel index, each map read once; then finish_pairs turns the sums into
// centroids and the loss (deterministic: fixed-order sums, no float atomics).
// Channels-last maps with 16-byte loads (the layout training uses) take both maps
// in one launch, split over pixels as well as channels (pair_sums_vec); other
// layouts take one launch per map: one block per (n, c) plane (NCHW) or per
// (n, a group of channels). Where each block of the two-map kernel sums whole
// planes, it can finish them itself (ForwardOptions::block_finish). Backward writes
// A*u[w] + B*v[h] + K per element.
#include <algorithm>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "centroid_align_kernel.h"

namespace dmfn_fast_cuda {
namespace {

constexpr int kPlaneThreads = 128;
constexpr int kFinishThreads = 256;
constexpr double kEps = 1e-7;  // added to every element by the reference

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// 16-byte vector loads and stores, unpacked to / packed from the accumulation type.
template <typename T> struct Vec;
template <> struct Vec<float> {
  static constexpr int n = 4;
  __device__ static void load(const float* p, float (&x)[4]) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
  }
  __device__ static void store(float* p, const float (&x)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  }
};
template <> struct Vec<double> {
  static constexpr int n = 2;
  __device__ static void load(const double* p, double (&x)[2]) {
    const double2 v = __ldg(reinterpret_cast<const double2*>(p));
    x[0] = v.x; x[1] = v.y;
  }
  __device__ static void store(double* p, const double (&x)[2]) {
    *reinterpret_cast<double2*>(p) = make_double2(x[0], x[1]);
  }
};
template <typename H, void (*Unpack)(unsigned, float&, float&), unsigned short (*FromF)(float)>
struct Vec16 {  // eight 16-bit floats in one uint4
  static constexpr int n = 8;
  __device__ static void load(const H* p, float (&x)[8]) { unpack(__ldg(reinterpret_cast<const uint4*>(p)), x); }
  __device__ static void unpack(const uint4 v, float (&x)[8]) {
    Unpack(v.x, x[0], x[1]);
    Unpack(v.y, x[2], x[3]);
    Unpack(v.z, x[4], x[5]);
    Unpack(v.w, x[6], x[7]);
  }
  __device__ static void store(H* p, const float (&x)[8]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = FromF(x[2 * i]) | (static_cast<unsigned>(FromF(x[2 * i + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};
__device__ void half_pair_to_f(unsigned b, float& lo, float& hi) {
  lo = __half2float(__ushort_as_half(static_cast<unsigned short>(b & 0xffffu)));
  hi = __half2float(__ushort_as_half(static_cast<unsigned short>(b >> 16)));
}
__device__ unsigned short f_to_half_bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
// A bfloat16 is a float's top 16 bits: one shift or mask each (through unsigned short it took two shifts).
__device__ void bf16_pair_to_f(unsigned b, float& lo, float& hi) {
  lo = __uint_as_float(b << 16);
  hi = __uint_as_float(b & 0xffff0000u);
}
__device__ unsigned short f_to_bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
template <> struct Vec<__half> : Vec16<__half, half_pair_to_f, f_to_half_bits> {};
template <> struct Vec<__nv_bfloat16> : Vec16<__nv_bfloat16, bf16_pair_to_f, f_to_bf16_bits> {};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T, typename A> __device__ __forceinline__ T from_acc(A x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sums of three values over the block; the result is valid in warp 0.
template <typename A, int THREADS>
__device__ __forceinline__ void block_sum3(A& a, A& b, A& c) {
  __shared__ A part[3][THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  a = warp_sum(a); b = warp_sum(b); c = warp_sum(c);
  if (lane == 0) { part[0][warp] = a; part[1][warp] = b; part[2][warp] = c; }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < THREADS / 32 ? part[0][lane] : A(0));
    b = warp_sum(lane < THREADS / 32 ? part[1][lane] : A(0));
    c = warp_sum(lane < THREADS / 32 ? part[2][lane] : A(0));
  }
}

// The sum of one value over the block (the finishes' loss shares), valid in warp 0: block_sum3's first value.
template <typename A, int THREADS>
__device__ __forceinline__ A block_sum1(A a) {
  __shared__ A part1[THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  a = warp_sum(a);
  if (lane == 0) part1[warp] = a;
  __syncthreads();
  if (warp == 0) a = warp_sum(lane < THREADS / 32 ? part1[lane] : A(0));
  return a;
}

// One block per (n, c) plane of a map whose rows have unit stride.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kPlaneThreads)
plane_sums(MapView m, long long C, int H, int W, typename AccOf<T>::type step_u,
           typename AccOf<T>::type step_v, typename AccOf<T>::type* sums) {
  using A = typename AccOf<T>::type;
  const long long nc = blockIdx.x;
  const T* plane = static_cast<const T*>(m.data) + (nc / C) * m.sN + (nc % C) * m.sC;
  A s0 = 0, sx = 0, sy = 0;
  if (VEC) {
    constexpr int V = Vec<T>::n;
    const int wv = W / V;
    for (int i = threadIdx.x; i < H * wv; i += kPlaneThreads) {
      const int h = i / wv, w0 = (i - h * wv) * V;
      A x[V];
      Vec<T>::load(plane + h * m.sH + w0, x);
      A r0 = 0, rx = 0;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        r0 += x[j];
        rx += x[j] * (static_cast<A>(w0 + j) * step_u - A(1));
      }
      s0 += r0;
      sx += rx;
      sy += r0 * (static_cast<A>(h) * step_v - A(1));
    }
  } else {
    for (int i = threadIdx.x; i < H * W; i += kPlaneThreads) {
      const int h = i / W, w = i - h * W;
      const A x = to_acc(plane[h * m.sH + w * m.sW]);
      s0 += x;
      sx += x * (static_cast<A>(w) * step_u - A(1));
      sy += x * (static_cast<A>(h) * step_v - A(1));
    }
  }
  block_sum3<A, kPlaneThreads>(s0, sx, sy);
  if (threadIdx.x == 0) {
    sums[nc * 3 + 0] = s0;
    sums[nc * 3 + 1] = sx;
    sums[nc * 3 + 2] = sy;
  }
}

// Channels last: one block per (n, 32 channels); lanes take channels (coalesced
// reads), the 32 warps take pixels; a shared-memory pass adds the warps up.
template <typename T>
__global__ void __launch_bounds__(1024)
channel_sums(MapView m, int C, int H, int W, typename AccOf<T>::type step_u, typename AccOf<T>::type step_v,
             typename AccOf<T>::type* sums) {
  using A = typename AccOf<T>::type;
  __shared__ A part[3][32][32];
  const int groups = (C + 31) / 32;
  const long long n = blockIdx.x / groups;
  const int c = (blockIdx.x % groups) * 32 + threadIdx.x;
  A s0 = 0, sx = 0, sy = 0;
  if (c < C) {
    const T* img = static_cast<const T*>(m.data) + n * m.sN + c * m.sC;
    for (int p = threadIdx.y; p < H * W; p += 32) {
      const int h = p / W, w = p - h * W;
      const A x = to_acc(img[h * m.sH + w * m.sW]);
      s0 += x;
      sx += x * (static_cast<A>(w) * step_u - A(1));
      sy += x * (static_cast<A>(h) * step_v - A(1));
    }
  }
  part[0][threadIdx.y][threadIdx.x] = s0;
  part[1][threadIdx.y][threadIdx.x] = sx;
  part[2][threadIdx.y][threadIdx.x] = sy;
  __syncthreads();
  if (threadIdx.y < 3 && c < C) {
    A s = 0;
#pragma unroll 8
    for (int r = 0; r < 32; ++r) s += part[threadIdx.y][r][threadIdx.x];
    sums[(n * C + c) * 3 + threadIdx.y] = s;
  }
}

// Channels last, 16-byte loads: one block per (n, kVecGroup vectors of V channels); thread (lane % 4)
// takes one vector of channels, the other 64 thread rows take pixels, four loads in flight each. The H200
// ran channel_sums at 0.8 TB/s on [16, 512, 32, 32] bf16 (2-byte loads across channels).
constexpr int kVecGroup = 4;                      // channel vectors per block
constexpr int kVecRows = 256 / kVecGroup;         // pixel rows per block

template <typename T>
__global__ void __launch_bounds__(256)
channel_sums_vec(MapView m, int C, int H, int W, typename AccOf<T>::type step_u, typename AccOf<T>::type step_v,
                 typename AccOf<T>::type* sums) {
  using A = typename AccOf<T>::type;
  constexpr int V = Vec<T>::n;
  const int vecs = C / V, groups = (vecs + kVecGroup - 1) / kVecGroup;
  const long long n = blockIdx.x / groups;
  const int cv = (blockIdx.x % groups) * kVecGroup + threadIdx.x % kVecGroup;  // this thread's channel vector
  const int row = threadIdx.x / kVecGroup;
  const bool active = cv < vecs;
  A s0[V], sx[V], sy[V];
#pragma unroll
  for (int j = 0; j < V; ++j) s0[j] = sx[j] = sy[j] = A(0);
  if (active) {
    const T* img = static_cast<const T*>(m.data) + n * m.sN + static_cast<long long>(cv) * V;
    const int HW = H * W;
    int p = row;
    for (; p + 3 * kVecRows < HW; p += 4 * kVecRows) {
      A x[4][V];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int q = p + r * kVecRows, h = q / W, w = q - h * W;
        Vec<T>::load(img + h * m.sH + w * m.sW, x[r]);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int q = p + r * kVecRows, h = q / W, w = q - h * W;
        const A u = static_cast<A>(w) * step_u - A(1), v = static_cast<A>(h) * step_v - A(1);
#pragma unroll
        for (int j = 0; j < V; ++j) { s0[j] += x[r][j]; sx[j] += x[r][j] * u; sy[j] += x[r][j] * v; }
      }
    }
    for (; p < HW; p += kVecRows) {
      const int h = p / W, w = p - h * W;
      A x[V];
      Vec<T>::load(img + h * m.sH + w * m.sW, x);
      const A u = static_cast<A>(w) * step_u - A(1), v = static_cast<A>(h) * step_v - A(1);
#pragma unroll
      for (int j = 0; j < V; ++j) { s0[j] += x[j]; sx[j] += x[j] * u; sy[j] += x[j] * v; }
    }
  }
  // Add up the rows: first the 8 rows within a warp (lanes with the same lane % kVecGroup), then the warps.
#pragma unroll
  for (int o = kVecGroup; o < 32; o <<= 1) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      s0[j] += __shfl_xor_sync(0xffffffffu, s0[j], o);
      sx[j] += __shfl_xor_sync(0xffffffffu, sx[j], o);
      sy[j] += __shfl_xor_sync(0xffffffffu, sy[j], o);
    }
  }
  __shared__ A part[8][3][kVecGroup * V];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane < kVecGroup) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      part[warp][0][lane * V + j] = s0[j];
      part[warp][1][lane * V + j] = sx[j];
      part[warp][2][lane * V + j] = sy[j];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 3 * kVecGroup * V; i += 256) {
    const int k = i / (kVecGroup * V), cc = i % (kVecGroup * V);
    const int c = (blockIdx.x % groups) * kVecGroup * V + cc;
    if (c < C) {
      A s = 0;
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) s += part[w8][k][cc];
      sums[(n * C + c) * 3 + k] = s;
    }
  }
}

// A plane's stats (S0, cx, cy) for both maps from its raw sums s[map][k], with the reference's eps added, into
// stats [2, NC, 3] at plane i; returns its squared centroid difference.
template <typename A>
__device__ __forceinline__ double plane_stats(const A (&s)[2][3], long long NC, long long i, A e0, A ex, A ey,
                                              A* stats) {
  A c[2][2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const A s0 = s[m][0] + e0;
    c[m][0] = (s[m][1] + ex) / s0;
    c[m][1] = (s[m][2] + ey) / s0;
    A* o = stats + (m * NC + i) * 3;
    o[0] = s0; o[1] = c[m][0]; o[2] = c[m][1];
  }
  const double dx = static_cast<double>(c[0][0] - c[1][0]), dy = static_cast<double>(c[0][1] - c[1][1]);
  return dx * dx + dy * dy;
}

// Plane i's stats (plane_stats) from its `splits` partial sums part[(split * 2 + map) * NC + i][k], added in
// split order, CHUNK splits' loads issued before their adds: all 16 runs a plane of whole-pixel blocks
// ([16, 512, 32, 32] on 132 SMs) in one round trip, where nvcc's own 4x unroll of the loop took one per 4
// splits (s15-s18: finish_pairs 3.7 us with one split, 4.2 with four).
template <typename A>
__device__ __forceinline__ double finish_plane(const A* part, int splits, long long NC, long long i, A e0, A ex,
                                               A ey, A* stats) {
  constexpr int CHUNK = 16;
  A s[2][3] = {};
  for (int sp0 = 0; sp0 < splits; sp0 += CHUNK) {
    A x[2][CHUNK][3];  // every load of the chunk issued before the first add
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int j = 0; j < CHUNK; ++j)
        if (sp0 + j < splits) {
          const A* q = part + ((static_cast<long long>(sp0 + j) * 2 + m) * NC + i) * 3;
#pragma unroll
          for (int k = 0; k < 3; ++k) x[m][j][k] = q[k];
        }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int j = 0; j < CHUNK; ++j)
        if (sp0 + j < splits) {
#pragma unroll
          for (int k = 0; k < 3; ++k) s[m][k] += x[m][j][k];
        }
  }
  return plane_stats(s, NC, i, e0, ex, ey, stats);
}

// The loss from the `count` loss shares another block of this launch, or the launch before, wrote: their sum
// in share order (deterministic), over the 2 * NC centroid differences.
template <typename A, int THREADS>
__device__ __forceinline__ void loss_from_shares(const double* shares, int count, long long NC, A* loss) {
  double t = 0;
  for (int b = threadIdx.x; b < count; b += THREADS) t += static_cast<const volatile double*>(shares)[b];
  t = block_sum1<double, THREADS>(t);
  if (threadIdx.x == 0) *loss = static_cast<A>(t / static_cast<double>(2 * NC));
}

// What the finish needs: the eps terms, the outputs, the loss partials (one per finish_pairs block, or with
// the block finish one per column of blocks) and finish_pairs' ticket, which the two-map kernel zeroes (else a
// memset), so it is zero when the finish starts.
template <typename A>
struct FinishArgs {
  A e0, ex, ey;
  A* stats;
  A* loss;
  double* loss_parts;
  unsigned* ticket;
};

// Channels last, 16-byte loads, both maps in one pass (the forward's fast path): one block per (n, VECS
// vectors of V channels, a run of pixels); thread (lane % VECS) takes one vector of channels, the other
// 256 / VECS thread rows take pixels, kPairPix<T> pixels of both maps in flight each (2 * kPairPix<T> 16-byte
// loads).
// plan_t sizes the runs so the blocks fill the card once (the blocks per SM from the occupancy API): the H200
// ran an earlier plan (2 pixels in flight, runs for "4 blocks per SM" of which 2 fit) at 28.5 us fwd+bwd on
// [16, 512, 32, 32] bf16, 42% of copy bandwidth. Raw sums go to part[(split * 2 + map) * NC + n * C + c][k].
// Then (FIN) either finish_pairs adds the splits up in a second launch, or (kFinBlock, one run per column: fp32
// [16, 512, 32, 32] on 132 SMs) each block turns its whole planes' sums into stats and its loss share, and
// sum_shares, one block, adds the shares: no re-read of the sums, no fence, no ticket.
// VECS: 8 channel vectors a block, so a warp loads 4 pixels' 128 bytes each; or (ForwardOptions::pixels) 32,
// 64, 128 or 256, at least the map's vectors: one column of blocks an image, each block reading whole pixels,
// so its bytes are one contiguous run of each map (8-vector blocks, and 32-vector ones that took 512 contiguous
// bytes a warp, both read at 2.0 TB/s on the H100, 67% of copy, where a Triton stream read the same bytes at
// 2.95, s18). 64 vectors and more take no block finish.
// (Measured and dropped, s11-s18, RESULTS.md: on the H200 and the H100, the finish folded into the last blocks,
// +0.8 to +1.7 us, and the loads staged through shared memory by cp.async, a tie to +1.3 us; on the H100,
// 32-vector blocks on maps of more vectors, -0.7% to +2.9%.)
constexpr int kPairVecs = 8;
constexpr int kWarpVecs = 32;  // a lane a vector: the widest blocks whose sums a warp shuffle still adds
// Pixels of both maps in flight per thread (sm_90 SASS: all their 16-byte loads issued before the first add).
// fp32: 6, 12 loads (it read at 2.88 TB/s with 8 on the H200, s10: bytes in flight; 8 pixels spilled on sm_80);
// 16-bit: 4, 8 loads (their unpacked values take 64 registers).
template <typename T> constexpr int kPairPix = 4;
template <> constexpr int kPairPix<float> = 6;

enum Fin { kFinKernel, kFinBlock };  // how the two-map kernel's sums are finished (above)

template <typename T, int VECS, Fin FIN>
__global__ void __launch_bounds__(256, 2)
pair_sums_vec(MapView ma, MapView mb, int C, int H, int W, int pix_per_split, typename AccOf<T>::type step_u,
              typename AccOf<T>::type step_v, typename AccOf<T>::type* part,
              FinishArgs<typename AccOf<T>::type> fin) {
  using A = typename AccOf<T>::type;
  constexpr int V = Vec<T>::n, ROWS = 256 / VECS;
  const int vecs = C / V, groups = (vecs + VECS - 1) / VECS;
  const long long n = blockIdx.x / groups, NC = static_cast<long long>(gridDim.x / groups) * C;
  const int cv = (blockIdx.x % groups) * VECS + threadIdx.x % VECS;
  const int row = threadIdx.x / VECS;
  if (FIN == kFinKernel && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0)
    *fin.ticket = 0u;  // finish_pairs' ticket
  A s[2][3][V];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int j = 0; j < V; ++j) s[m][0][j] = s[m][1][j] = s[m][2][j] = A(0);
  // Adds a pixel's vectors of both maps (x[map][channel]) at (h, w) to the sums.
  auto add = [&](int h, int w, const A (&x)[2][V]) {
    const A u = static_cast<A>(w) * step_u - A(1), v = static_cast<A>(h) * step_v - A(1);
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        s[m][0][j] += x[m][j];
        s[m][1][j] += x[m][j] * u;
        s[m][2][j] += x[m][j] * v;
      }
  };
  if (cv < vecs) {
    const T* pa = static_cast<const T*>(ma.data) + n * ma.sN + static_cast<long long>(cv) * V;
    const T* pb = static_cast<const T*>(mb.data) + n * mb.sN + static_cast<long long>(cv) * V;
    // Pixel p's (h, w) and its addresses in both maps, stepped ROWS pixels at a time: no division or
    // 64-bit multiply per pixel (they took a third of the loop's instructions).
    struct At {
      int h, w;
      const T *a, *b;
    };
    const int dh = ROWS / W, dw = ROWS - dh * W;
    const long long da = dh * ma.sH + dw * ma.sW, db = dh * mb.sH + dw * mb.sW;
    const long long wrap_a = ma.sH - W * ma.sW, wrap_b = mb.sH - W * mb.sW;
    auto next = [&](At& q) {
      q.w += dw;
      q.h += dh;
      q.a += da;
      q.b += db;
      if (q.w >= W) { q.w -= W; ++q.h; q.a += wrap_a; q.b += wrap_b; }
    };
    auto load = [&](const At& q, A (&x)[2][V]) {
      Vec<T>::load(q.a, x[0]);
      Vec<T>::load(q.b, x[1]);
    };
    const int p_end = min(H * W, (blockIdx.y + 1) * pix_per_split);
    int p = blockIdx.y * pix_per_split + row;
    At at;
    at.h = p / W;
    at.w = p - at.h * W;
    at.a = pa + at.h * ma.sH + at.w * ma.sW;
    at.b = pb + at.h * mb.sH + at.w * mb.sW;
    for (; p + (kPairPix<T> - 1) * ROWS < p_end; p += kPairPix<T> * ROWS) {
      At qs[kPairPix<T>];
      A x[kPairPix<T>][2][V];  // every load issued before the first add
#pragma unroll
      for (int r = 0; r < kPairPix<T>; ++r) {
        qs[r] = at;
        next(at);
        load(qs[r], x[r]);
      }
#pragma unroll
      for (int r = 0; r < kPairPix<T>; ++r) add(qs[r].h, qs[r].w, x[r]);
    }
    if (p < p_end) {  // the run's last pixels, fewer than a step: their loads issued together too
      At qs[kPairPix<T>];
      A x[kPairPix<T>][2][V];
      bool in[kPairPix<T>];
#pragma unroll
      for (int r = 0; r < kPairPix<T>; ++r) {
        qs[r] = at;
        next(at);
        in[r] = p + r * ROWS < p_end;
        if (in[r]) load(qs[r], x[r]);
      }
#pragma unroll
      for (int r = 0; r < kPairPix<T>; ++r)
        if (in[r]) add(qs[r].h, qs[r].w, x[r]);
    }
  }
  // Add up the rows: the 32 / VECS rows within a warp (VECS < 32), then in shared memory the block's kRows
  // partial rows: its 8 warps, or (VECS > 32, every lane a vector of its own) its 256 / VECS thread rows.
#pragma unroll
  for (int o = VECS; o < 32; o <<= 1)
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int k = 0; k < 3; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) s[m][k][j] += __shfl_xor_sync(0xffffffffu, s[m][k][j], o);
  constexpr int kCh = VECS * V;  // channels per block
  static_assert(FIN != kFinBlock || kCh <= 256, "the block finish takes one thread per channel");
  constexpr int kRows = VECS <= 32 ? 8 : 256 / VECS;
  // Both maps' sums at once where they take at most 24 KB, else one map after the other (16-bit maps, 32 or
  // more vectors: 48 KB, past the static limit).
  constexpr int kMaps = kRows * 2 * 3 * kCh * sizeof(A) <= 24576 ? 2 : 1;
  __shared__ A sh[kRows][kMaps][3][kCh];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int prow = VECS <= 32 ? warp : threadIdx.x / VECS, slot = threadIdx.x % VECS;  // = lane where VECS <= 32
  A whole[2][3] = {};  // kFinBlock: thread cc's channel, both maps' sums over the block
#pragma unroll
  for (int m0 = 0; m0 < 2; m0 += kMaps) {
    if (m0 > 0) __syncthreads();  // the first map's sums are read before the second's overwrite them
    if (VECS >= 32 || lane < VECS) {
#pragma unroll
      for (int mm = 0; mm < kMaps; ++mm)
#pragma unroll
        for (int k = 0; k < 3; ++k)
#pragma unroll
          for (int j = 0; j < V; ++j) sh[prow][mm][k][slot * V + j] = s[m0 + mm][k][j];
    }
    __syncthreads();
    if constexpr (FIN == kFinBlock) {  // the same adds in the same order as below
      if (threadIdx.x < kCh) {
#pragma unroll
        for (int mm = 0; mm < kMaps; ++mm)
#pragma unroll
          for (int k = 0; k < 3; ++k) {
            A t = 0;
#pragma unroll
            for (int r = 0; r < kRows; ++r) t += sh[r][mm][k][threadIdx.x];
            whole[m0 + mm][k] = t;
          }
      }
    } else {
      for (int i = threadIdx.x; i < kMaps * 3 * kCh; i += 256) {
        const int cc = i % kCh, k = (i / kCh) % 3, mm = i / (3 * kCh);
        const int c = (blockIdx.x % groups) * kCh + cc;
        if (c < C) {
          A t = 0;
#pragma unroll
          for (int r = 0; r < kRows; ++r) t += sh[r][mm][k][cc];
          part[((static_cast<long long>(blockIdx.y) * 2 + m0 + mm) * NC + n * C + c) * 3 + k] = t;
        }
      }
    }
  }
  if constexpr (FIN == kFinBlock) {
    // This block's sums are whole planes' (one run per column): its stats here, its loss share for sum_shares.
    const int c = (blockIdx.x % groups) * kCh + threadIdx.x;
    double d = 0;
    if (c < C && threadIdx.x < kCh) d = plane_stats(whole, NC, n * C + c, fin.e0, fin.ex, fin.ey, fin.stats);
    d = block_sum1<double, 256>(d);
    if (threadIdx.x == 0) fin.loss_parts[blockIdx.x] = d;
  }
}

// Raw sums -> stats and the loss = mean over (n, c, {x, y}) of the squared centroid difference: one thread
// per plane (finish_plane; part may be stats itself when splits == 1); each block's loss partial goes to
// fin.loss_parts, and the last block to finish (the ticket *fin.ticket, which starts at 0) adds them up in
// block order: deterministic.
template <typename A>
__global__ void __launch_bounds__(kFinishThreads)
finish_pairs(const A* part, int splits, long long NC, FinishArgs<A> fin) {
  const long long i = static_cast<long long>(blockIdx.x) * kFinishThreads + threadIdx.x;
  double d = 0;
  if (i < NC) d = finish_plane(part, splits, NC, i, fin.e0, fin.ex, fin.ey, fin.stats);
  d = block_sum1<double, kFinishThreads>(d);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    fin.loss_parts[blockIdx.x] = d;
    __threadfence();  // this block's partial is visible before its ticket
    last = atomicAdd(fin.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  loss_from_shares<A, kFinishThreads>(fin.loss_parts, static_cast<int>(gridDim.x), NC, fin.loss);
}

// The loss from the two-map kernel's loss shares, one per column, where each block finished its own planes
// (Plan::block): one block, no ticket.
template <typename A>
__global__ void __launch_bounds__(kFinishThreads)
sum_shares(const double* shares, int count, long long NC, A* loss) {
  loss_from_shares<A, kFinishThreads>(shares, count, NC, loss);
}

// grad = a*u[w] + b*v[h] + k for plane i of map `which`.
template <typename A>
__device__ __forceinline__ void grad_coeffs(const A* grad, const A* stats, long long NC, long long i, int which,
                                            A& a, A& b, A& k) {
  const A* o = stats + i * 3;
  const A* t = stats + (NC + i) * 3;
  const A* mine = which ? t : o;
  const A g = (which ? -*grad : *grad) / static_cast<A>(NC);
  const A gx = g * (o[1] - t[1]), gy = g * (o[2] - t[2]);
  a = gx / mine[0];
  b = gy / mine[0];
  k = -(gx * mine[1] + gy * mine[2]) / mine[0];
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kPlaneThreads)
grad_planes(const typename AccOf<T>::type* grad, const typename AccOf<T>::type* stats, long long NC, int which,
            int H, int W, typename AccOf<T>::type step_u, typename AccOf<T>::type step_v, T* out) {
  using A = typename AccOf<T>::type;
  const long long nc = blockIdx.x;
  A a, b, k;
  grad_coeffs(grad, stats, NC, nc, which, a, b, k);
  T* plane = out + nc * H * W;
  if (VEC) {
    constexpr int V = Vec<T>::n;
    const int wv = W / V;
    for (int i = threadIdx.x; i < H * wv; i += kPlaneThreads) {
      const int h = i / wv, w0 = (i - h * wv) * V;
      const A rk = b * (static_cast<A>(h) * step_v - A(1)) + k;
      A x[V];
#pragma unroll
      for (int j = 0; j < V; ++j) x[j] = a * (static_cast<A>(w0 + j) * step_u - A(1)) + rk;
      Vec<T>::store(plane + h * W + w0, x);
    }
  } else {
    for (int i = threadIdx.x; i < H * W; i += kPlaneThreads) {
      const int h = i / W, w = i - h * W;
      plane[i] = from_acc<T, A>(a * (static_cast<A>(w) * step_u - A(1)) + b * (static_cast<A>(h) * step_v - A(1)) + k);
    }
  }
}

// NHWC: blockIdx.x = one (n, h) row, blockIdx.y = 32 channels, warps split W.
template <typename T>
__global__ void __launch_bounds__(256)
grad_channels(const typename AccOf<T>::type* grad, const typename AccOf<T>::type* stats, int C, int which, int H,
              int W, typename AccOf<T>::type step_u, typename AccOf<T>::type step_v, T* out) {
  using A = typename AccOf<T>::type;
  const long long nh = blockIdx.x, n = nh / H;
  const int h = static_cast<int>(nh - n * H);
  const int c = blockIdx.y * 32 + threadIdx.x;
  if (c >= C) return;
  const long long NC = static_cast<long long>(gridDim.x / H) * C;
  A a, b, k;
  grad_coeffs(grad, stats, NC, n * C + c, which, a, b, k);
  const A rk = b * (static_cast<A>(h) * step_v - A(1)) + k;
  T* row = out + nh * W * C + c;
  for (int w = threadIdx.y; w < W; w += 8) row[static_cast<long long>(w) * C] = from_acc<T, A>(a * (static_cast<A>(w) * step_u - A(1)) + rk);
}

// NHWC, 16-byte stores: blockIdx.x = (n, `rows` image rows), blockIdx.y = 32 vectors of V channels (one per
// lane), the 8 warps split W. The block's threads work out one channel's coefficients each, into shared
// memory, before any store: each warp worked out its lane's V channels itself before (8 times over, with
// 3 * V divisions serial with the first store). rows: GradOptions (4 by default).
template <typename T>
__global__ void __launch_bounds__(256)
grad_channels_vec(const typename AccOf<T>::type* grad, const typename AccOf<T>::type* stats, int N, int C,
                  int which, int H, int W, typename AccOf<T>::type step_u, typename AccOf<T>::type step_v, int rows,
                  T* out) {
  using A = typename AccOf<T>::type;
  constexpr int V = Vec<T>::n, kCh = 32 * V;  // channels per block, at most 256
  static_assert(kCh <= 256, "one thread per channel's coefficients");
  __shared__ A coef[3][kCh];
  const int chunks = (H + rows - 1) / rows;
  const long long n = blockIdx.x / chunks;
  const int h0 = static_cast<int>(blockIdx.x % chunks) * rows;
  const long long NC = static_cast<long long>(N) * C;
  const int c0 = blockIdx.y * kCh;
  if (threadIdx.x < kCh && c0 + static_cast<int>(threadIdx.x) < C) {
    A a, b, k;
    grad_coeffs(grad, stats, NC, n * C + c0 + threadIdx.x, which, a, b, k);
    coef[0][threadIdx.x] = a;
    coef[1][threadIdx.x] = b;
    coef[2][threadIdx.x] = k;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  if (c0 + lane * V >= C) return;
  A a[V], b[V], k[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    a[j] = coef[0][lane * V + j];
    b[j] = coef[1][lane * V + j];
    k[j] = coef[2][lane * V + j];
  }
  for (int h = h0; h < H && h < h0 + rows; ++h) {
    const A vh = static_cast<A>(h) * step_v - A(1);
    T* row = out + (n * H + h) * W * C + c0 + lane * V;
    for (int w = threadIdx.x / 32; w < W; w += 8) {
      const A u = static_cast<A>(w) * step_u - A(1);
      A x[V];
#pragma unroll
      for (int j = 0; j < V; ++j) x[j] = a[j] * u + b[j] * vh + k[j];
      Vec<T>::store(row + static_cast<long long>(w) * C, x);
    }
  }
}

template <typename T>
bool aligned_for_vec(const void* p, long long stride) {
  constexpr int V = 16 / sizeof(T);
  return reinterpret_cast<unsigned long long>(p) % 16 == 0 && stride % V == 0;
}

// A channels-last map whose pixels' channels come as whole 16-byte vectors: the 16-byte channel kernels'.
template <typename T>
bool channel_vectors(const MapView& m, long long N, long long C) {
  constexpr int V = 16 / sizeof(T);
  return m.sC == 1 && C % V == 0 && aligned_for_vec<T>(m.data, m.sW) && m.sH % V == 0 && (N == 1 || m.sN % V == 0);
}

template <typename T>
cudaError_t map_sums_t(MapView m, long long N, long long C, int H, int W, void* sums, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const A su = static_cast<A>(2.0 / W), sv = static_cast<A>(2.0 / H);
  A* out = static_cast<A*>(sums);
  if (m.sW == 1 || W == 1) {
    constexpr int V = 16 / sizeof(T);
    const bool vec = m.sW == 1 && W % V == 0 && aligned_for_vec<T>(m.data, m.sH) &&
                     (C == 1 || m.sC % V == 0) && (N == 1 || m.sN % V == 0);
    if (vec) plane_sums<T, true><<<N * C, kPlaneThreads, 0, stream>>>(m, C, H, W, su, sv, out);
    else plane_sums<T, false><<<N * C, kPlaneThreads, 0, stream>>>(m, C, H, W, su, sv, out);
  } else if (m.sC == 1 || C == 1) {
    constexpr int V = 16 / sizeof(T);
    if (channel_vectors<T>(m, N, C)) {
      const long long groups = (C / V + kVecGroup - 1) / kVecGroup;
      channel_sums_vec<T><<<N * groups, 256, 0, stream>>>(m, static_cast<int>(C), H, W, su, sv, out);
    } else {
      const long long groups = (C + 31) / 32;
      channel_sums<T><<<N * groups, dim3(32, 32), 0, stream>>>(m, static_cast<int>(C), H, W, su, sv, out);
    }
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// ask() for the current device, asked once per device (every call where the device is unknown). `cache`
// holds ask() + 1: 0 is "not asked yet".
constexpr int kDevices = 64;
template <typename Ask>
int once_per_device(int (&cache)[kDevices], Ask ask) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) return ask();
  if (cache[dev] == 0) cache[dev] = ask() + 1;
  return cache[dev] - 1;
}

// Blocks of pair_sums_vec<T, VECS, kFinKernel> that fit on one SM of the current device (registers decide:
// 2 on sm_90).
template <typename T, int VECS>
int pair_blocks_per_sm() {
  static int cache[kDevices] = {};
  return once_per_device(cache, [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, pair_sums_vec<T, VECS, kFinKernel>, 256, 0) !=
            cudaSuccess ||
        n < 1) {
      cudaGetLastError();  // not sticky; fall back to the launch bound's 2
      n = 2;
    }
    return n;
  });
}

// The forward's launch plan: the two-map kernel where both maps allow it, how it splits the pixels, and the
// scratch memory (partial sums, the loss partials, finish_pairs' ticket).
struct Plan {
  bool pair = false;
  bool block = false;  // each block finishes its own planes (one run per column), sum_shares the loss
  int vecs = kPairVecs;  // channel vectors a block of the two-map kernel takes
  long long groups = 0, columns = 0;
  int pix_per_split = 0, splits = 1;
  long long finish_blocks = 0;
  size_t part_bytes = 0, loss_offset = 0, counter_offset = 0, bytes = 0;
};

// f(std::integral_constant<int, VECS>{}) for a plan's block width: the one list of the two-map kernel's widths.
template <typename F>
decltype(auto) with_vecs(int vecs, F f) {
  switch (vecs) {
    case kPairVecs: return f(std::integral_constant<int, kPairVecs>{});
    case kWarpVecs: return f(std::integral_constant<int, kWarpVecs>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return f(std::integral_constant<int, 256>{});
  }
}

template <typename T>
Plan plan_t(const MapView& a, const MapView& b, long long N, long long C, int H, int W, const ForwardOptions& o) {
  using A = typename AccOf<T>::type;
  Plan p;
  const long long NC = N * C;
  p.finish_blocks = (NC + kFinishThreads - 1) / kFinishThreads;
  p.pair = channel_vectors<T>(a, N, C) && channel_vectors<T>(b, N, C);
  if (p.pair) {
    // As many blocks as fit on the card at once (more runs would only add a second, short wave of blocks,
    // each with its reduction), each over whole kPairPix<T>-pixel steps of its rows; with whole-pixel blocks,
    // over whole rows (fp32's step is 48 pixels in 32-vector blocks: whole steps would cut [16, 512, 32, 32]
    // into runs of 288, 288, 288 and 160 pixels).
    const long long vecs = C / Vec<T>::n;
    p.vecs = kPairVecs;
    if (o.pixels && vecs > 16 && vecs <= 256)  // whole pixels a block, at least half its lanes busy
      p.vecs = vecs <= 32 ? 32 : vecs <= 64 ? 64 : vecs <= 128 ? 128 : 256;
    p.groups = (vecs + p.vecs - 1) / p.vecs;
    p.columns = N * p.groups;
    const int per_sm = with_vecs(p.vecs, [](auto v) { return pair_blocks_per_sm<T, decltype(v)::value>(); });
    const long long fit = static_cast<long long>(per_sm) * std::max(o.sms, 1);
    const int rows = 256 / p.vecs, step = kPairPix<T> * rows, unit = p.vecs >= kWarpVecs ? rows : step;
    const int HW = H * W;
    const long long most = (HW + step - 1) / step;  // runs of at least one step
    const long long want = std::min(most, std::max(1LL, fit / p.columns));
    const long long pix = (HW + want - 1) / want;
    p.pix_per_split = static_cast<int>((pix + unit - 1) / unit * unit);
    p.splits = (HW + p.pix_per_split - 1) / p.pix_per_split;
    p.block = o.block_finish && p.splits == 1 && p.vecs <= kWarpVecs;
    p.part_bytes = p.block ? 0 : static_cast<size_t>(p.splits) * 2 * NC * 3 * sizeof(A);
  }
  // loss partials: finish_pairs' per block, or a column's each (finished in blocks); then the ticket
  p.loss_offset = (p.part_bytes + 15) / 16 * 16;
  p.counter_offset = p.loss_offset + static_cast<size_t>(p.block ? p.columns : p.finish_blocks) * sizeof(double);
  p.bytes = p.counter_offset + sizeof(unsigned);
  return p;
}

template <typename T, Fin FIN>
void launch_pair(const Plan& p, MapView a, MapView b, int C, int H, int W, typename AccOf<T>::type su,
                 typename AccOf<T>::type sv, typename AccOf<T>::type* part,
                 FinishArgs<typename AccOf<T>::type> fin, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.columns), p.splits);
  with_vecs(p.vecs, [&](auto v) {
    // wider whole-pixel blocks: the plan gives them no block finish
    if constexpr (decltype(v)::value <= kWarpVecs || FIN != kFinBlock)
      pair_sums_vec<T, decltype(v)::value, FIN><<<grid, 256, 0, stream>>>(a, b, C, H, W, p.pix_per_split, su, sv,
                                                                          part, fin);
  });
}

template <typename T>
cudaError_t forward_t(MapView a, MapView b, long long N, long long C, int H, int W, const ForwardOptions& o,
                      void* stats_v, void* loss, void* work, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const Plan p = plan_t<T>(a, b, N, C, H, W, o);
  const long long NC = N * C;
  const A su = static_cast<A>(2.0 / W), sv = static_cast<A>(2.0 / H);
  char* ws = static_cast<char*>(work);
  // The reference's eps in closed form: sum(eps), sum(eps*u), sum(eps*v).
  double sum_u = 0, sum_v = 0;
  for (int w = 0; w < W; ++w) sum_u += static_cast<A>(w) * su - A(1);
  for (int h = 0; h < H; ++h) sum_v += static_cast<A>(h) * sv - A(1);
  const FinishArgs<A> fin{static_cast<A>(kEps * H * W), static_cast<A>(kEps * H * sum_u),
                          static_cast<A>(kEps * W * sum_v), static_cast<A*>(stats_v), static_cast<A*>(loss),
                          reinterpret_cast<double*>(ws + p.loss_offset),
                          reinterpret_cast<unsigned*>(ws + p.counter_offset)};
  const A* part = fin.stats;  // one launch per map: the raw sums go to stats, which finish_pairs turns in place
  if (p.pair) {
    A* pp = reinterpret_cast<A*>(ws);
    if (p.block) {
      launch_pair<T, kFinBlock>(p, a, b, static_cast<int>(C), H, W, su, sv, pp, fin, stream);
      sum_shares<A><<<1, kFinishThreads, 0, stream>>>(fin.loss_parts, static_cast<int>(p.columns), NC, fin.loss);
      return cudaGetLastError();
    }
    launch_pair<T, kFinKernel>(p, a, b, static_cast<int>(C), H, W, su, sv, pp, fin, stream);
    part = pp;
  } else {
    cudaError_t err = map_sums_t<T>(a, N, C, H, W, fin.stats, stream);
    if (err == cudaSuccess) err = map_sums_t<T>(b, N, C, H, W, fin.stats + NC * 3, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(fin.ticket, 0, sizeof(unsigned), stream);
    if (err != cudaSuccess) return err;
  }
  finish_pairs<A><<<static_cast<unsigned>(p.finish_blocks), kFinishThreads, 0, stream>>>(
      part, p.splits, NC, fin);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_t(const void* grad, const void* stats, long long N, long long C, int H, int W, int which,
                   bool channels_last, void* out, cudaStream_t stream, const GradOptions& o) {
  using A = typename AccOf<T>::type;
  const A su = static_cast<A>(2.0 / W), sv = static_cast<A>(2.0 / H);
  const A* g = static_cast<const A*>(grad);
  const A* st = static_cast<const A*>(stats);
  T* out_t = static_cast<T*>(out);
  constexpr int V = 16 / sizeof(T);
  if (channels_last && C % V == 0 && reinterpret_cast<unsigned long long>(out) % 16 == 0) {
    if (o.rows < 1) return cudaErrorInvalidValue;
    const long long chunks = (H + o.rows - 1) / o.rows;
    grad_channels_vec<T><<<dim3(N * chunks, (C / V + 31) / 32), 256, 0, stream>>>(
        g, st, static_cast<int>(N), static_cast<int>(C), which, H, W, su, sv, o.rows, out_t);
  } else if (channels_last) {
    grad_channels<T><<<dim3(N * H, (C + 31) / 32), dim3(32, 8), 0, stream>>>(g, st, static_cast<int>(C), which, H,
                                                                              W, su, sv, out_t);
  } else if (W % (16 / sizeof(T)) == 0 && reinterpret_cast<unsigned long long>(out) % 16 == 0) {
    grad_planes<T, true><<<N * C, kPlaneThreads, 0, stream>>>(g, st, N * C, which, H, W, su, sv, out_t);
  } else {
    grad_planes<T, false><<<N * C, kPlaneThreads, 0, stream>>>(g, st, N * C, which, H, W, su, sv, out_t);
  }
  return cudaGetLastError();
}

}  // namespace

size_t forward_work_bytes(MapView out, MapView tgt, DType dtype, long long N, long long C, int H, int W,
                          const ForwardOptions& opt) {
  switch (dtype) {
    case kFloat32: return plan_t<float>(out, tgt, N, C, H, W, opt).bytes;
    case kFloat16: return plan_t<__half>(out, tgt, N, C, H, W, opt).bytes;
    case kBFloat16: return plan_t<__nv_bfloat16>(out, tgt, N, C, H, W, opt).bytes;
    case kFloat64: return plan_t<double>(out, tgt, N, C, H, W, opt).bytes;
  }
  return 0;
}

cudaError_t launch_forward(MapView out, MapView tgt, DType dtype, long long N, long long C, int H, int W,
                           const ForwardOptions& opt, void* stats, void* loss, void* work, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return forward_t<float>(out, tgt, N, C, H, W, opt, stats, loss, work, stream);
    case kFloat16: return forward_t<__half>(out, tgt, N, C, H, W, opt, stats, loss, work, stream);
    case kBFloat16: return forward_t<__nv_bfloat16>(out, tgt, N, C, H, W, opt, stats, loss, work, stream);
    case kFloat64: return forward_t<double>(out, tgt, N, C, H, W, opt, stats, loss, work, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_grad(const void* grad, const void* stats, DType dtype, long long N, long long C, int H, int W,
                        int which, bool channels_last, void* out, cudaStream_t stream, const GradOptions& o) {
  switch (dtype) {
    case kFloat32: return grad_t<float>(grad, stats, N, C, H, W, which, channels_last, out, stream, o);
    case kFloat16: return grad_t<__half>(grad, stats, N, C, H, W, which, channels_last, out, stream, o);
    case kBFloat16: return grad_t<__nv_bfloat16>(grad, stats, N, C, H, W, which, channels_last, out, stream, o);
    case kFloat64: return grad_t<double>(grad, stats, N, C, H, W, which, channels_last, out, stream, o);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dmfn_fast_cuda

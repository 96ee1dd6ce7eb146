// dmfn_fast::centroid_align_{fwd,bwd}: CPU kernels (schema: dmfn_fast/ops/centroid_align.py).
//
// Forward reads each map once and keeps, per (n, c), S0 = sum f, Sx = sum f*u,
// Sy = sum f*v with u, v made from the pixel index (u along W, v along H, as in
// the paper). The reference's +1e-7 per element is added in closed form. It
// returns the loss and stats [2, N, C, 3] = (S0, cx, cy) for out and tgt.
// Backward only writes: d loss / d f[h, w] = (gx*(u[w]-cx) + gy*(v[h]-cy)) / S0.
#include "centroid_align.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#ifdef DMFN_PY_MODULE
#include <Python.h>
// `import dmfn_fast._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
#endif

namespace dmfn_fast {
namespace {

// The reference's grids: float(i) * float(2/n) - 1 in the accumulation type.
template <typename acc_t>
std::vector<acc_t> grid(int64_t n) {
  std::vector<acc_t> g(n);
  const acc_t step = static_cast<acc_t>(2.0 / static_cast<double>(n));
  for (int64_t i = 0; i < n; ++i) g[i] = static_cast<acc_t>(i) * step - acc_t(1);
  return g;
}

// Tasks per thread chunk so that a chunk holds ~32K elements: small maps run
// serially instead of waking every OpenMP thread.
constexpr int64_t kGrainElems = 32768;
int64_t grain(int64_t elems_per_task) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_task));
}

template <typename acc_t>
acc_t sum_of(const std::vector<acc_t>& g) {
  acc_t s = 0;
  for (acc_t x : g) s += x;
  return s;
}

// Raw sums of one map into sums[(n*C + c)*3 + {0,1,2}].
template <typename scalar_t, typename acc_t>
void map_sums(const at::Tensor& f, const acc_t* u, const acc_t* v, acc_t* sums) {
  const int64_t N = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3);
  const int64_t sN = f.stride(0), sC = f.stride(1), sH = f.stride(2), sW = f.stride(3);
  const scalar_t* p = f.const_data_ptr<scalar_t>();

  if (pick_walk(f) == Walk::Planes) {
    // One (n, c) plane per task; L independent lanes so the compiler vectorizes
    // the reduction without reassociating it.
    constexpr int L = 16;
    at::parallel_for(0, N * C, grain(H * W), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const scalar_t* plane = p + (nc / C) * sN + (nc % C) * sC;
        acc_t a0[L] = {}, ax[L] = {}, ay[L] = {};
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* row = plane + h * sH;
          const acc_t vh = v[h];
          int64_t w = 0;
          for (; w + L <= W; w += L) {
            for (int j = 0; j < L; ++j) {
              const acc_t x = static_cast<acc_t>(row[w + j]);
              a0[j] += x;
              ax[j] += x * u[w + j];
              ay[j] += x * vh;
            }
          }
          for (; w < W; ++w) {  // W == 1 may come with any stride
            const acc_t x = static_cast<acc_t>(row[w * sW]);
            a0[0] += x;
            ax[0] += x * u[w];
            ay[0] += x * vh;
          }
        }
        acc_t s0 = 0, sx = 0, sy = 0;
        for (int j = 0; j < L; ++j) {
          s0 += a0[j];
          sx += ax[j];
          sy += ay[j];
        }
        sums[nc * 3 + 0] = s0;
        sums[nc * 3 + 1] = sx;
        sums[nc * 3 + 2] = sy;
      }
    });
  } else {
    // Channels-last: one (n, block of CB channels) per task, vectorized over channels.
    constexpr int64_t CB = 16;
    const int64_t blocks = (C + CB - 1) / CB;
    at::parallel_for(0, N * blocks, grain(CB * H * W), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, c0 = (t % blocks) * CB, cb = std::min(CB, C - c0);
        acc_t a0[CB] = {}, ax[CB] = {}, ay[CB] = {};
        const scalar_t* img = p + n * sN + c0 * sC;
        for (int64_t h = 0; h < H; ++h) {
          // Per-row partial sums keep the fp32 error at O(H + W), not O(H * W).
          acc_t r0[CB] = {}, rx[CB] = {};
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* px = img + h * sH + w * sW;
            const acc_t uw = u[w];
            if (cb == CB) {
              for (int64_t j = 0; j < CB; ++j) {
                const acc_t x = static_cast<acc_t>(px[j]);
                r0[j] += x;
                rx[j] += x * uw;
              }
            } else {
              for (int64_t j = 0; j < cb; ++j) {
                const acc_t x = static_cast<acc_t>(px[j * sC]);
                r0[j] += x;
                rx[j] += x * uw;
              }
            }
          }
          const acc_t vh = v[h];
          for (int64_t j = 0; j < CB; ++j) {
            a0[j] += r0[j];
            ax[j] += rx[j];
            ay[j] += r0[j] * vh;
          }
        }
        for (int64_t j = 0; j < cb; ++j) {
          acc_t* s = sums + (n * C + c0 + j) * 3;
          s[0] = a0[j];
          s[1] = ax[j];
          s[2] = ay[j];
        }
      }
    });
  }
}

// plan: the CUDA forward's launch plan (centroid_align_cuda.cpp); one loop here, so checked and unused
std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& f_out_in, const at::Tensor& f_tgt_in, int64_t plan) {
  check_fwd_inputs(f_out_in, f_tgt_in);
  check_plan(plan);
  const at::Tensor f_out = walkable(f_out_in), f_tgt = walkable(f_tgt_in);
  const int64_t N = f_out.size(0), C = f_out.size(1), H = f_out.size(2), W = f_out.size(3);
  const auto acc = acc_type(f_out.scalar_type());
  at::Tensor stats = at::empty({2, N, C, 3}, f_out.options().dtype(acc));
  at::Tensor loss = at::empty({}, f_out.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f_out.scalar_type(), "centroid_align_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto u = grid<acc_t>(W), v = grid<acc_t>(H);
    // The reference's eps, in closed form: sum(eps) and sum(eps*u), sum(eps*v).
    const acc_t e0 = static_cast<acc_t>(kEps * H * W);
    const acc_t ex = static_cast<acc_t>(kEps) * static_cast<acc_t>(H) * sum_of(u);
    const acc_t ey = static_cast<acc_t>(kEps) * static_cast<acc_t>(W) * sum_of(v);
    acc_t* st = stats.data_ptr<acc_t>();
    map_sums<scalar_t, acc_t>(f_out, u.data(), v.data(), st);
    map_sums<scalar_t, acc_t>(f_tgt, u.data(), v.data(), st + N * C * 3);
    double total = 0;
    for (int64_t i = 0; i < 2 * N * C; ++i) {
      acc_t* s = st + i * 3;
      const acc_t s0 = s[0] + e0;
      s[1] = (s[1] + ex) / s0;
      s[2] = (s[2] + ey) / s0;
      s[0] = s0;
    }
    for (int64_t i = 0; i < N * C; ++i) {
      const double dx = st[i * 3 + 1] - st[(N * C + i) * 3 + 1];
      const double dy = st[i * 3 + 2] - st[(N * C + i) * 3 + 2];
      total += dx * dx + dy * dy;
    }
    loss.fill_(total / static_cast<double>(2 * N * C));
  });
  return {loss, stats};
}

at::Tensor bwd_cpu(const at::Tensor& grad, const at::Tensor& stats_in, const at::Tensor& like, int64_t which) {
  check_bwd_inputs(grad, stats_in, like, which);
  const int64_t N = like.size(0), C = like.size(1), H = like.size(2), W = like.size(3);
  const bool cl = grad_channels_last(like);
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                           : at::MemoryFormat::Contiguous));
  const at::Tensor stats = stats_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "centroid_align_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto u = grid<acc_t>(W), v = grid<acc_t>(H);
    const acc_t* st = stats.const_data_ptr<acc_t>();
    // grad f = A*u[w] + B*v[h] + K per (n, c).
    const acc_t g = grad.item<acc_t>() / static_cast<acc_t>(N * C) * (which == 0 ? acc_t(1) : acc_t(-1));
    std::vector<acc_t> A(N * C), B(N * C), K(N * C);
    for (int64_t i = 0; i < N * C; ++i) {
      const acc_t* mine = st + (which * N * C + i) * 3;
      const acc_t gx = g * (st[i * 3 + 1] - st[(N * C + i) * 3 + 1]);
      const acc_t gy = g * (st[i * 3 + 2] - st[(N * C + i) * 3 + 2]);
      A[i] = gx / mine[0];
      B[i] = gy / mine[0];
      K[i] = -(gx * mine[1] + gy * mine[2]) / mine[0];
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    if (!cl) {
      at::parallel_for(0, N * C, grain(H * W), [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
          scalar_t* plane = o + nc * H * W;
          for (int64_t h = 0; h < H; ++h) {
            const acc_t rk = B[nc] * v[h] + K[nc];
            for (int64_t w = 0; w < W; ++w) plane[h * W + w] = static_cast<scalar_t>(A[nc] * u[w] + rk);
          }
        }
      });
    } else {
      at::parallel_for(0, N * H, grain(W * C), [&](int64_t begin, int64_t end) {
        for (int64_t nh = begin; nh < end; ++nh) {
          const int64_t n = nh / H, h = nh % H;
          const acc_t *a = A.data() + n * C, *b = B.data() + n * C, *k = K.data() + n * C;
          for (int64_t w = 0; w < W; ++w) {
            scalar_t* px = o + (nh * W + w) * C;
            const acc_t uw = u[w], vh = v[h];
            for (int64_t c = 0; c < C; ++c) px[c] = static_cast<scalar_t>(a[c] * uw + b[c] * vh + k[c]);
          }
        }
      });
    }
  });
  return out;
}

}  // namespace

// The schema is defined in Python (dmfn_fast/ops/centroid_align.py, at import, with its fake kernel and
// autograd); this library only adds kernels, checked against that schema by the dispatcher.
TORCH_LIBRARY_IMPL(dmfn_fast, CPU, m) {
  m.impl("centroid_align_fwd", &fwd_cpu);
  m.impl("centroid_align_bwd", &bwd_cpu);
}

}  // namespace dmfn_fast

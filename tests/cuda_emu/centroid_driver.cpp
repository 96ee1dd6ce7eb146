// Runs the centroid op's CUDA launchers (csrc/centroid_align_kernel.cu, its launches rewritten for the CPU
// stand-in in include/) on maps read from files, for tests/test_centroid_cuda_emu.py. Buffers have the exact
// size of the data, so AddressSanitizer sees a read past one; scratch and outputs start as garbage.
//   forward DTYPE N C H W SMS OCC BLOCK PIXELS SEED A OFF sN sC sH sW B OFF sN sC sH sW STATS_OUT LOSS_OUT
//     (OCC: blocks per SM by registers)
//   grad DTYPE N C H W WHICH CHANNELS_LAST SEED GRAD STATS OUT [ROWS]
//   round DTYPE IN OUT   (fp16 or bf16: float32 in, the 16-bit values and their floats out; checks the stand-in)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "centroid_align_kernel.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace {

using namespace dmfn_fast_cuda;

size_t elem_size(DType d) { return d == kFloat32 ? 4 : d == kFloat64 ? 8 : 2; }
size_t acc_size(DType d) { return d == kFloat64 ? 8 : 4; }

struct Buf {
  void* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t bytes, int fill) : n(bytes) {
    p = ::operator new[](bytes ? bytes : 1, std::align_val_t(16));
    std::memset(p, fill, bytes);
  }
  ~Buf() { ::operator delete[](p, std::align_val_t(16)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

std::unique_ptr<Buf> read_file(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) { std::perror(path); std::exit(2); }
  std::fseek(f, 0, SEEK_END);
  const long n = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  auto b = std::make_unique<Buf>(static_cast<size_t>(n), 0);
  if (std::fread(b->p, 1, b->n, f) != b->n) { std::perror(path); std::exit(2); }
  std::fclose(f);
  return b;
}

void write_file(const char* path, const void* p, size_t n) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(p, 1, n, f) != n) { std::perror(path); std::exit(2); }
  std::fclose(f);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) { std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e)); std::exit(3); }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const std::string op = argv[1];
  std::vector<long long> v;
  auto num = [&](int i) { return std::atoll(argv[i]); };
  if (op == "forward" && argc == 26) {
    const DType dt = static_cast<DType>(num(2));
    const long long N = num(3), C = num(4);
    const int H = static_cast<int>(num(5)), W = static_cast<int>(num(6));
    ForwardOptions opt;
    opt.sms = static_cast<int>(num(7));
    emu::occupancy = static_cast<int>(num(8));
    opt.block_finish = num(9) != 0;
    opt.pixels = num(10) != 0;
    emu::rng.seed(static_cast<unsigned>(num(11)));
    const auto a = read_file(argv[12]), b = read_file(argv[18]);
    const MapView ma{static_cast<char*>(a->p) + num(13) * elem_size(dt), num(14), num(15), num(16), num(17)};
    const MapView mb{static_cast<char*>(b->p) + num(19) * elem_size(dt), num(20), num(21), num(22), num(23)};
    Buf stats(2 * N * C * 3 * acc_size(dt), 0xA5), loss(acc_size(dt), 0xA5);
    Buf work(forward_work_bytes(ma, mb, dt, N, C, H, W, opt), 0xA5);
    check(launch_forward(ma, mb, dt, N, C, H, W, opt, stats.p, loss.p, work.p, nullptr), "launch_forward");
    write_file(argv[24], stats.p, stats.n);
    write_file(argv[25], loss.p, loss.n);
    std::printf("grids:%s\n", emu::grids.c_str());
    return 0;
  }
  if (op == "grad" && (argc == 13 || argc == 14)) {
    const DType dt = static_cast<DType>(num(2));
    const long long N = num(3), C = num(4);
    const int H = static_cast<int>(num(5)), W = static_cast<int>(num(6)), which = static_cast<int>(num(7));
    const bool cl = num(8) != 0;
    emu::rng.seed(static_cast<unsigned>(num(9)));
    const auto g = read_file(argv[10]), st = read_file(argv[11]);
    Buf out(N * C * H * W * elem_size(dt), 0xFF);
    GradOptions opt;
    if (argc == 14) opt.rows = static_cast<int>(num(13));
    check(launch_grad(g->p, st->p, dt, N, C, H, W, which, cl, out.p, nullptr, opt), "launch_grad");
    write_file(argv[12], out.p, out.n);
    return 0;
  }
  if (op == "round" && argc == 5) {
    const DType dt = static_cast<DType>(num(2));
    const auto in = read_file(argv[3]);
    const size_t n = in->n / 4;
    std::vector<unsigned short> bits(n);
    std::vector<float> back(n);
    for (size_t i = 0; i < n; ++i) {
      const float f = static_cast<const float*>(in->p)[i];
      if (dt == kFloat16) {
        bits[i] = __half_as_ushort(__float2half_rn(f));
        back[i] = __half2float(__ushort_as_half(bits[i]));
      } else {
        bits[i] = __bfloat16_as_ushort(__float2bfloat16_rn(f));
        back[i] = __bfloat162float(__ushort_as_bfloat16(bits[i]));
      }
    }
    std::vector<char> out(n * 6);
    std::memcpy(out.data(), bits.data(), n * 2);
    std::memcpy(out.data() + n * 2, back.data(), n * 4);
    write_file(argv[4], out.data(), out.size());
    return 0;
  }
  std::fprintf(stderr, "usage: see the comment at the top of centroid_driver.cpp\n");
  return 2;
}

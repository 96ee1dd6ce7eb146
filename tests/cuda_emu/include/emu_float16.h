// CPU stand-ins for cuda_fp16.h and cuda_bf16.h (see cuda_runtime.h here): IEEE half and bfloat16 as their
// 16 bits, converted with round to nearest even.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

template <int Kind>  // 0: half, 1: bfloat16; distinct types, as CUDA's are
struct Float16Bits {
  unsigned short x;
};
using __half = Float16Bits<0>;
using __nv_bfloat16 = Float16Bits<1>;
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return {b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

inline float __half2float(__half h) {
  const unsigned sign = (h.x >> 15) & 1u, exp = (h.x >> 10) & 0x1fu, man = h.x & 0x3ffu;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(man), -24);  // zero and subnormals
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

inline __half __float2half_rn(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  const unsigned short sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return {static_cast<unsigned short>(sign | 0x7e00u)};
  if (a >= 65520.0f) return {static_cast<unsigned short>(sign | 0x7c00u)};  // rounds to infinity
  if (a < std::ldexp(1.0f, -14)) {  // subnormal: a multiple of 2^-24, rounded to nearest even by rint
    return {static_cast<unsigned short>(sign | static_cast<unsigned>(std::nearbyint(std::ldexp(a, 24))))};
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  unsigned q = static_cast<unsigned>(std::nearbyint(std::ldexp(m, 11)));  // 11 significant bits
  if (q == 2048u) { q = 1024u; ++e; }
  const unsigned exp = static_cast<unsigned>(e + 14);  // biased exponent of 1.xxx * 2^(e-1)
  if (exp >= 31) return {static_cast<unsigned short>(sign | 0x7c00u)};
  return {static_cast<unsigned short>(sign | (exp << 10) | (q & 0x3ffu))};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  const unsigned u = static_cast<unsigned>(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<unsigned short>((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<unsigned short>(u >> 16)};
}

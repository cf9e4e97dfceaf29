// 8-lane (AVX2) helpers shared by onspec's CPU kernels: bf16 <-> fp32 conversion with the roundings of
// bf16.h, and exp. Header-only: every kernel source is compiled with -mavx2 -mfma.
#pragma once
#include <cmath>
#include <cstdint>
#include <immintrin.h>

namespace onspec {

// ---- 8 lanes at a time (AVX2), the same roundings as the scalar helpers in bf16.h ----

inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// fp32 bits rounded to nearest-even bf16 (kept in the top half), NaN made quiet: float_to_bf16 per lane
inline __m256i rne8(__m256 f) {
  const __m256i u = _mm256_castps_si256(f), top = _mm256_set1_epi32(-65536);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), top);
  const __m256i quiet = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x400000)), top);
  return _mm256_blendv_epi8(r, quiet, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}

inline __m256 round8(__m256 f) { return _mm256_castsi256_ps(rne8(f)); }

inline void store8(uint16_t* p, __m256 f) {
  const __m256i b = _mm256_srli_epi32(rne8(f), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

// exp(x) for 8 floats (silu, attention's softmax): Cephes' expf (range reduction by ln 2 in two parts, degree-5
// polynomial), within about 1 ulp of fp32, so after rounding to bf16 it agrees with PyTorch's (SLEEF) exp
// except in the rare case that the fp32 value lies within an ulp of a bf16 rounding boundary. Above
// ln(FLT_MAX) it is +inf, as PyTorch's (silu(-100) must be -0, not a tiny negative). Below -87 it returns
// about exp(-87) instead of a denormal: 1 + that is 1 in fp32 anyway. Scalar std::exp took 5 ns an
// element: 70 ms per 300-token prefill of the default model.
inline __m256 exp8(__m256 x) {
  const __m256 overflow = _mm256_cmp_ps(x, _mm256_set1_ps(88.72283935546875f), _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.72283935546875f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  // y * 2^n as y * 2^(n-1) * 2: n reaches 128 at the top of the range, whose 2^n has no fp32 encoding
  const __m256i half_pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(126)), 23);
  const __m256 r = _mm256_mul_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(half_pow2n)), _mm256_set1_ps(2.0f));
  return _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), overflow);
}

}  // namespace onspec

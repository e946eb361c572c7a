// Vectorized exp for the AVX2 + FMA builds of the CPU kernels. Include it only inside a
// file's `#pragma GCC target("avx2,fma")` region, inside that file's own namespace and
// after <immintrin.h> (no includes or namespace here), never from portable code: its
// inline functions carry AVX2 instructions.
#pragma once

// exp(x) for x <= 0 (scores minus their running max), ~1 ulp: x = n ln2 + r, |r| <= ln2/2,
// e^r by Cephes' degree-6 polynomial, 2^n into the exponent. Below -87 it flushes to 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 min_x = _mm256_set1_ps(-87.0f);
  const __m256 underflow = _mm256_cmp_ps(x, min_x, _CMP_LT_OQ);
  x = _mm256_max_ps(x, min_x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n)));
}

// silu(g) * u = g * sigmoid(g) * u, with exp only of -|g| <= 0:
// sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) for g < 0, e = exp(-|g|).
inline __m256 silu_mul(__m256 g, __m256 u) {
  const __m256 neg_abs = _mm256_or_ps(g, _mm256_set1_ps(-0.f));
  const __m256 e = exp_nonpositive(neg_abs);
  const __m256 num = _mm256_blendv_ps(_mm256_set1_ps(1.f), e, g);  // sign bit of g picks e
  const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.f), e));
  return _mm256_mul_ps(_mm256_mul_ps(g, sig), u);
}

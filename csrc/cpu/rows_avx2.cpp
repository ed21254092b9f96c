// The AVX2 row kernels (avx2 + fma; ops.cpp checks the CPU before using them): rows_vec.h's
// template over ymm traits. Philox: 4 64-bit lanes per register (16 columns); a register's words
// 0/1 (2/3) merge into column-order pairs by a shuffle and a blend, folded, compared and moved to
// 8 bits, and spread by shifts and masks (no pdep: microcoded on AMD Zen 1 and 2). The passes: 8
// columns a step, one byte of keep bits expanded to 8 all-ones / zero lanes.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#include <immintrin.h>

#include "rows_vec.h"

namespace lorakern {
namespace cpu {
namespace {

struct V256 {
  using R = __m256i;
  static constexpr int LANES = 4;
  static R set1(uint32_t x) { return _mm256_set1_epi32((int)x); }
  static R zero() { return _mm256_setzero_si256(); }
  static R counters(uint64_t c) {
    return _mm256_add_epi64(_mm256_set1_epi64x((long long)c), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static R mul(R a, R b) { return _mm256_mul_epu32(a, b); }
  static R high(R a) { return _mm256_shuffle_epi32(a, 0xB1); }
  static R xor2(R a, R b) { return _mm256_xor_si256(a, b); }
  static R xor3(R a, R b, R c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }

  // fold < 2^31, so the signed compare is the unsigned one
  static uint32_t pair_bits(R a, R b, R thr) {
    const R w = _mm256_blend_epi32(a, _mm256_shuffle_epi32(b, 0xB1), 0xAA);
    const R keep = _mm256_cmpgt_epi32(_mm256_xor_si256(w, _mm256_srai_epi32(w, 31)), thr);
    return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(keep));
  }
  static uint32_t spread(uint32_t x) {
    x = (x | (x << 4)) & 0x0F0Fu;
    return (x | (x << 2)) & 0x3333u;
  }

  using F = __m256;
  using Mask = __m256;
  static constexpr int W = 8;
  static Mask keep(const uint32_t* bits, int64_t k) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i b = _mm256_set1_epi32((int)((bits[k >> 5] >> (k & 31)) & 0xFFu));
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel));
  }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F load(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // nearest even, NaN -> 0x7FC0 (rows.h's f32_to_bf16)
  static void store(uint16_t* p, F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                          _mm256_set1_epi32(0x7FFF));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08)));
  }
  static F set1f(float x) { return _mm256_set1_ps(x); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F select(Mask m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
};

}  // namespace

const Isa kAvx2 = VecRows<V256>::table("avx2");

}  // namespace cpu
}  // namespace lorakern

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif

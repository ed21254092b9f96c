// The AVX-512 row kernels (avx512f/bw/vl + bmi2; ops.cpp checks the CPU before using them):
// rows_vec.h's template over zmm traits. Philox: 8 64-bit lanes per register (32 columns); a
// register's words 0/1 (2/3) merge into column-order pairs by one masked shuffle, folded and
// compared into 16 mask bits, and pdep spreads them. The passes: 16 columns a step, their keep
// bits read as one mask register.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,bmi2")
#endif
#include <immintrin.h>

#include "rows_vec.h"

namespace lorakern {
namespace cpu {
namespace {

struct V512 {
  using R = __m512i;
  static constexpr int LANES = 8;
  static R set1(uint32_t x) { return _mm512_set1_epi32((int)x); }
  static R zero() { return _mm512_setzero_si512(); }
  static R counters(uint64_t c) {
    return _mm512_add_epi64(_mm512_set1_epi64((long long)c), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static R mul(R a, R b) { return _mm512_mul_epu32(a, b); }
  static R high(R a) { return _mm512_shuffle_epi32(a, _MM_PERM_CDAB); }
  static R xor2(R a, R b) { return _mm512_xor_si512(a, b); }
  static R xor3(R a, R b, R c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }

  static uint32_t pair_bits(R a, R b, R thr) {
    const R w = _mm512_mask_shuffle_epi32(a, 0xAAAA, b, _MM_PERM_CDAB);
    return _mm512_cmpgt_epu32_mask(_mm512_xor_si512(w, _mm512_srai_epi32(w, 31)), thr);
  }
  static uint32_t spread(uint32_t x) { return _pdep_u32(x, 0x33333333u); }

  using F = __m512;
  using Mask = __mmask16;
  static constexpr int W = 16;
  static Mask keep(const uint32_t* bits, int64_t k) { return (Mask)(bits[k >> 5] >> (k & 31)); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // nearest even, NaN -> 0x7FC0 (rows.h's f32_to_bf16)
  static void store(uint16_t* p, F v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                          _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static F set1f(float x) { return _mm512_set1_ps(x); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F select(Mask m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
};

}  // namespace

const Isa kAvx512 = VecRows<V512>::table("avx512");

}  // namespace cpu
}  // namespace lorakern

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif

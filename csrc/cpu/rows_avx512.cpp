// The AVX-512 row kernels (avx512f/bw/vl + bmi2; ops.cpp checks the CPU before using them).
// keep_bits: 32 Philox counters (128 columns) per step in four zmm registers of 8 64-bit lanes
// each (rows.h's philox_lanes; 4 independent registers cover the multiply latency). Words 0/1 and
// 2/3 are merged into column order pairs by one masked shuffle each, folded and compared to give
// 16 mask bits per pair, and pdep spreads the two pair masks into the 32 column bits.
// The passes read 16 columns' bits as one mask register: masked loads zero the dropped columns;
// masked stores write only kept ones; the tail is one more masked step (no scalar loop).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,bmi2")
#endif
#include <immintrin.h>

#include "rows.h"

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
};

// 16 bits: bit 2i = word a of lane i kept, bit 2i + 1 = word b of lane i kept.
inline uint32_t pair_bits(__m512i a, __m512i b, __m512i thr) {
  const __m512i w = _mm512_mask_shuffle_epi32(a, 0xAAAA, b, _MM_PERM_CDAB);
  return _mm512_cmpgt_epu32_mask(_mm512_xor_si512(w, _mm512_srai_epi32(w, 31)), thr);
}

void keep_bits(const Stream& s, int64_t row, uint32_t* bits) {
  constexpr int NV = 4;
  const int64_t groups = (s.K + 3) / 4;
  const __m512i thr = _mm512_set1_epi32((int)s.thr);
  for (int64_t k0 = 0; k0 < s.K; k0 += 32 * NV) {
    __m512i w0[NV], w1[NV], w2[NV], w3[NV];
    philox_lanes<V512, NV>(s, (uint64_t)(row * groups + k0 / 4), w0, w1, w2, w3);
    for (int v = 0; v < NV; ++v)
      bits[k0 / 32 + v] = _pdep_u32(pair_bits(w0[v], w1[v], thr), 0x33333333u) |
                          _pdep_u32(pair_bits(w2[v], w3[v], thr), 0xCCCCCCCCu);
  }
}

// The 16-column step at column k: its keep mask, and the mask of its columns below K.
inline __mmask16 keep16(const uint32_t* bits, int64_t k) { return (__mmask16)(bits[k >> 5] >> (k & 31)); }
inline __mmask16 cols16(int64_t k, int64_t K) {
  return K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
}

inline __m512 load_bf16(__mmask16 m, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Nearest-even bfloat16 of 16 floats, NaN -> 0x7FC0 (rows.h's f32_to_bf16).
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

void mask_f32(const float* src, const uint32_t* bits, float* dst, int64_t K) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 c = cols16(k, K);
    _mm512_mask_storeu_ps(dst + k, c, _mm512_maskz_loadu_ps(keep16(bits, k) & c, src + k));
  }
}

void mask_bf16(const uint16_t* src, const uint32_t* bits, float* dst, int64_t K) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 c = cols16(k, K);
    _mm512_mask_storeu_ps(dst + k, c, load_bf16(keep16(bits, k) & c, src + k));
  }
}

void add_f32(float* dst, const float* src, float scale, const uint32_t* bits, int64_t K) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = keep16(bits, k) & cols16(k, K);
    const __m512 d = _mm512_maskz_loadu_ps(m, dst + k), v = _mm512_maskz_loadu_ps(m, src + k);
    _mm512_mask_storeu_ps(dst + k, m, _mm512_fmadd_ps(v, sc, d));
  }
}

void add_bf16(uint16_t* dst, const float* src, float scale, const uint32_t* bits, int64_t K) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = keep16(bits, k) & cols16(k, K);
    const __m512 d = load_bf16(m, dst + k), v = _mm512_maskz_loadu_ps(m, src + k);
    _mm256_mask_storeu_epi16(dst + k, m, to_bf16(_mm512_fmadd_ps(v, sc, d)));
  }
}

}  // namespace

const Isa kAvx512 = {"avx512", keep_bits, mask_f32, mask_bf16, add_f32, add_bf16};

}  // namespace cpu
}  // namespace lorakern

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif

// The AVX2 row kernels (avx2 + fma; ops.cpp checks the CPU before using them). keep_bits: 16
// Philox counters (64 columns) per step in four ymm registers of 4 64-bit lanes (rows.h's
// philox_lanes); words 0/1 and 2/3 are merged into column-order pairs by a shuffle and a blend,
// folded, compared and moved to 8 bits each, and spread_pairs puts the pairs in column order
// (shifts and masks: no pdep, which is microcoded on AMD Zen 1 and 2). The passes expand one byte
// of bits to an 8-lane mask; the last K % 8 columns take rows.h's scalar loops.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#include <immintrin.h>

#include "rows.h"

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
};

// 8 bits: bit 2i = word a of lane i kept, bit 2i + 1 = word b of lane i kept (fold < 2^31, so
// the signed compare is the unsigned one).
inline uint32_t pair_bits(__m256i a, __m256i b, __m256i thr) {
  const __m256i w = _mm256_blend_epi32(a, _mm256_shuffle_epi32(b, 0xB1), 0xAA);
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_xor_si256(w, _mm256_srai_epi32(w, 31)), thr);
  return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(keep));
}

// Pair i (bits 2i, 2i + 1) of an 8-bit value moved to bits 4i, 4i + 1.
inline uint32_t spread_pairs(uint32_t x) {
  x = (x | (x << 4)) & 0x0F0Fu;
  return (x | (x << 2)) & 0x3333u;
}

void keep_bits(const Stream& s, int64_t row, uint32_t* bits) {
  constexpr int NV = 4;
  const int64_t groups = (s.K + 3) / 4;
  const __m256i thr = _mm256_set1_epi32((int)s.thr);
  for (int64_t k0 = 0; k0 < s.K; k0 += 16 * NV) {
    __m256i w0[NV], w1[NV], w2[NV], w3[NV];
    philox_lanes<V256, NV>(s, (uint64_t)(row * groups + k0 / 4), w0, w1, w2, w3);
    for (int h = 0; h < NV / 2; ++h) {
      uint32_t word = 0;
      for (int v = 2 * h; v < 2 * h + 2; ++v)
        word |= (spread_pairs(pair_bits(w0[v], w1[v], thr)) | spread_pairs(pair_bits(w2[v], w3[v], thr)) << 2)
                << (16 * (v - 2 * h));
      bits[k0 / 32 + h] = word;
    }
  }
}

// The keep mask of the 8 columns at k (k % 8 == 0) as lanes of all ones / zeros.
inline __m256i keep8(const uint32_t* bits, int64_t k) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_set1_epi32((int)((bits[k >> 5] >> (k & 31)) & 0xFFu));
  return _mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel);
}

inline __m256 load_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Nearest-even bfloat16 of 8 floats, NaN -> 0x7FC0 (rows.h's f32_to_bf16).
inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

void mask_f32(const float* src, const uint32_t* bits, float* dst, int64_t K) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_and_ps(_mm256_loadu_ps(src + k), _mm256_castsi256_ps(keep8(bits, k))));
  mask_f32_from(src, bits, dst, k, K);
}

void mask_bf16(const uint16_t* src, const uint32_t* bits, float* dst, int64_t K) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_and_ps(load_bf16(src + k), _mm256_castsi256_ps(keep8(bits, k))));
  mask_bf16_from(src, bits, dst, k, K);
}

void add_f32(float* dst, const float* src, float scale, const uint32_t* bits, int64_t K) {
  const __m256 sc = _mm256_set1_ps(scale);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 d = _mm256_loadu_ps(dst + k);
    const __m256 r = _mm256_fmadd_ps(_mm256_loadu_ps(src + k), sc, d);
    _mm256_storeu_ps(dst + k, _mm256_blendv_ps(d, r, _mm256_castsi256_ps(keep8(bits, k))));
  }
  add_f32_from(dst, src, scale, bits, k, K);
}

void add_bf16(uint16_t* dst, const float* src, float scale, const uint32_t* bits, int64_t K) {
  const __m256 sc = _mm256_set1_ps(scale);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 d = load_bf16(dst + k);
    const __m256 r = _mm256_blendv_ps(d, _mm256_fmadd_ps(_mm256_loadu_ps(src + k), sc, d),
                                      _mm256_castsi256_ps(keep8(bits, k)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), to_bf16(r));
  }
  add_bf16_from(dst, src, scale, bits, k, K);
}

}  // namespace

const Isa kAvx2 = {"avx2", keep_bits, mask_f32, mask_bf16, add_f32, add_bf16};

}  // namespace cpu
}  // namespace lorakern

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif

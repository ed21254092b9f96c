// The AVX2 row kernels (avx2 + fma; ops.cpp checks the CPU before using them): rows_vec.h's
// template over ymm traits. Philox: 4 64-bit lanes per register (16 columns); a register's words
// 0/1 (2/3) merge into column-order pairs by a shuffle and a blend, folded, compared and moved to
// 8 bits, and spread by shifts and masks (no pdep: microcoded on AMD Zen 1 and 2). The passes: 8
// columns a step, one byte of keep bits expanded to 8 all-ones / zero lanes.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LORAKERN_ROWS_TARGET "avx2,fma"
#include "rows_target.h"

namespace lorakern {
namespace cpu {
namespace {

// VecLanes' operations on ymm, and what AVX2 does its own way
struct V256 : VecLanes<V256, __v4di, __v8su, __v8sf> {
  static R mul(R a, R b) { return _mm256_mul_epu32(a, b); }

  static uint32_t pair_bits(R a, R b, R thr) {
    const R w = _mm256_blend_epi32(a, _mm256_shuffle_epi32(b, 0xB1), 0xAA);
    return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(fold(w), thr)));
  }
  static uint32_t spread(uint32_t x) {
    x = (x | (x << 4)) & 0x0F0Fu;
    return (x | (x << 2)) & 0x3333u;
  }

  using Mask = __m256;
  static Mask keep(const uint32_t* bits, int64_t k) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i b = _mm256_set1_epi32((int)((bits[k >> 5] >> (k & 31)) & 0xFFu));
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel));
  }
  static F select(Mask m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }

  static U32 widen(const uint16_t* p) {
    return (U32)_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // packus keeps each 128-bit half's four words; the two halves' first 64 bits are joined
  static void narrow(uint16_t* p, U32 h) {
    const __m256i w = _mm256_packus_epi32((__m256i)h, (__m256i)h);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(w, 0x08)));
  }
};

}  // namespace

const Isa kAvx2 = VecRows<V256>::table("avx2");

}  // namespace cpu
}  // namespace lorakern

LORAKERN_ROWS_TARGET_END
#endif

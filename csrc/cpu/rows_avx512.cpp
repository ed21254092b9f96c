// The AVX-512 row kernels (avx512f/bw/vl + bmi2; ops.cpp checks the CPU before using them):
// rows_vec.h's template over zmm traits. Philox: 8 64-bit lanes per register (32 columns); a
// register's words 0/1 (2/3) merge into column-order pairs by one masked shuffle, folded and
// compared into 16 mask bits, and pdep spreads them. The passes: 16 columns a step, their keep
// bits read as one mask register.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LORAKERN_ROWS_TARGET "avx512f,avx512bw,avx512vl,bmi2"
#include "rows_target.h"

namespace lorakern {
namespace cpu {
namespace {

// VecLanes' operations on zmm, and what AVX-512 does its own way
struct V512 : VecLanes<V512, __v8di, __v16su, __v16sf> {
  static R mul(R a, R b) { return _mm512_mul_epu32(a, b); }
  // VecLanes' a ^ b ^ c makes the same vpternlogd, but GCC's unroller counts it as two
  // statements and leaves philox_lanes' nine rounds rolled
  static R xor3(R a, R b, R c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }

  static uint32_t pair_bits(R a, R b, R thr) {
    return _mm512_cmpgt_epu32_mask(fold(_mm512_mask_shuffle_epi32(a, 0xAAAA, b, _MM_PERM_CDAB)), thr);
  }
  static uint32_t spread(uint32_t x) { return _pdep_u32(x, 0x33333333u); }

  using Mask = __mmask16;
  static Mask keep(const uint32_t* bits, int64_t k) { return (Mask)(bits[k >> 5] >> (k & 31)); }
  static F select(Mask m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }

  static U32 widen(const uint16_t* p) {
    return (U32)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void narrow(uint16_t* p, U32 h) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)h));
  }
};

}  // namespace

const Isa kAvx512 = VecRows<V512>::table("avx512");

}  // namespace cpu
}  // namespace lorakern

LORAKERN_ROWS_TARGET_END
#endif

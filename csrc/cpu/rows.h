// Row kernels of the CPU extension: the dropout keep-mask of one row of x as bits, and the
// passes that apply those bits to a row. One table of them per instruction set (rows_generic.cpp;
// rows_avx2.cpp and rows_avx512.cpp, both rows_vec.h's template); ops.cpp picks the best the CPU
// runs, once.
//
// The stream is the one of ARCHITECTURE.md (csrc/philox.h is its scalar form): element (row, col)
// of x [M, K] is kept iff U(word col % 4 of Philox-4x32-10 at counter row * ceil(K / 4) + col / 4)
// > p. U(w) = (w < 0 ? ~w : w) * 2^-31 in float32 (w read as int32) is monotone in the integer
// fold(w) = w ^ (w >> 31), so the test is the integer compare fold(w) > thr, with thr the largest
// t in [0, 2^31) whose float32 U is <= p (ops.cpp finds it once per call): bit for bit the float test.
//
// Keep bits: bit k % 32 of word k / 32 is column k's keep decision; a row's buffer holds
// bit_words(K) words (keep_bits may write past column K up to a multiple of 128 columns).
//
// Every function here has internal linkage: each instruction-set file compiles this header with
// its own target flags, and no copy may leak into another (the linker would pick any one).
#pragma once
#include <stdint.h>
#include <string.h>

namespace lorakern {
namespace cpu {

// The dropout stream of one call: the key schedule, the integer threshold and the row length.
struct Stream {
  uint64_t seed;
  uint32_t k0[10], k1[10];  // the key of Philox round r: (seed lo, seed hi) + r * (0x9E3779B9, 0xBB67AE85)
  uint32_t thr;             // keep iff fold(word) > thr
  int64_t K;                // columns of x: the counter stride is ceil(K / 4)
};

// One instruction set's row kernels. `bits` are a row's keep bits (see above); K columns.
struct Isa {
  const char* name;
  void (*keep_bits)(const Stream& s, int64_t row, uint32_t* bits);
  // dst[k] = keep ? src[k] : 0  (dst may be src)
  void (*mask_f32)(const float* src, const uint32_t* bits, float* dst, int64_t K);
  // dst[k] = keep ? float(src[k]) : 0, src bfloat16 bits
  void (*mask_bf16)(const uint16_t* src, const uint32_t* bits, float* dst, int64_t K);
  // dst[k] += keep ? scale * src[k] : 0
  void (*add_f32)(float* dst, const float* src, float scale, const uint32_t* bits, int64_t K);
  // dst[k] = bf16(float(dst[k]) + (keep ? scale * src[k] : 0)), one rounding (nearest even)
  void (*add_bf16)(uint16_t* dst, const float* src, float scale, const uint32_t* bits, int64_t K);
};

extern const Isa kGeneric;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LORAKERN_CPU_X86 1
extern const Isa kAvx2;    // avx2, fma
extern const Isa kAvx512;  // avx512f, avx512bw, avx512vl, bmi2
#endif

namespace {

// Words of a row's keep-bit buffer: K rounded up to 128 columns (the widest keep_bits block).
inline int64_t bit_words(int64_t K) { return (K + 127) / 128 * 4; }

constexpr uint32_t kMulA = 0xD2511F53u;  // multiplies word 0 (philox.h)
constexpr uint32_t kMulB = 0xCD9E8D57u;  // multiplies word 2

inline bool kept(const uint32_t* bits, int64_t k) { return (bits[k >> 5] >> (k & 31)) & 1u; }

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// c10::BFloat16's rounding: nearest even, NaN -> 0x7FC0.
inline uint16_t f32_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// A row element as f32, and an f32 stored as one: T is float, or uint16_t holding bfloat16 bits
// (rounded once, f32_to_bf16).
inline float as_f32(float f) { return f; }
inline float as_f32(uint16_t h) { return bf16_to_f32(h); }
inline void put_f32(float* d, float f) { *d = f; }
inline void put_f32(uint16_t* d, float f) { *d = f32_to_bf16(f); }

// The scalar forms of the Isa passes over columns [k0, K): the generic table, and the vector
// tables' tails.
template <class T>
inline void mask_from(const T* src, const uint32_t* bits, float* dst, int64_t k0, int64_t K) {
  for (int64_t k = k0; k < K; ++k) dst[k] = kept(bits, k) ? as_f32(src[k]) : 0.f;
}
template <class T>
inline void add_from(T* dst, const float* src, float scale, const uint32_t* bits, int64_t k0, int64_t K) {
  for (int64_t k = k0; k < K; ++k)
    if (kept(bits, k)) put_f32(dst + k, as_f32(dst[k]) + scale * src[k]);
}

// Philox-4x32-10 over NV registers of V::LANES counters c, c + 1, ... (V::LANES * NV of them).
// Each 64-bit lane carries one 32-bit state word in its low half: one unsigned 32x32->64
// multiply (pmuludq) then gives both the high word (moved down by a half swap) and the low word
// (already in place); upper halves hold junk that no multiply reads and no result uses.
// Round 0 has words 2 and 3 at zero, so it costs one multiply. Out: words 0..3 per register.
template <class V, int NV>
inline void philox_lanes(const Stream& s, uint64_t c, typename V::R (&w0)[NV], typename V::R (&w1)[NV],
                         typename V::R (&w2)[NV], typename V::R (&w3)[NV]) {
  using R = typename V::R;
  const R ma = V::set1(kMulA), mb = V::set1(kMulB);
  for (int v = 0; v < NV; ++v) {
    const R cnt = V::counters(c + (uint64_t)(v * V::LANES));
    const R p0 = V::mul(cnt, ma);
    w0[v] = V::xor2(V::high(cnt), V::set1(s.k0[0]));
    w2[v] = V::xor2(V::high(p0), V::set1(s.k1[0]));
    w1[v] = V::zero();
    w3[v] = p0;
  }
  for (int r = 1; r < 10; ++r) {
    const R k0 = V::set1(s.k0[r]), k1 = V::set1(s.k1[r]);
    for (int v = 0; v < NV; ++v) {
      const R p0 = V::mul(w0[v], ma), p2 = V::mul(w2[v], mb);
      w0[v] = V::xor3(V::high(p2), w1[v], k0);
      w2[v] = V::xor3(V::high(p0), w3[v], k1);
      w1[v] = p2;
      w3[v] = p0;
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lorakern

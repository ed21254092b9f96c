// The vector row kernels (rows.h's Isa table) as one template over an instruction set's traits V;
// rows_avx2.cpp and rows_avx512.cpp define V and instantiate it under their own target
// (rows_target.h; every function here has internal linkage, as in rows.h: no copy leaks into
// another file).
//
// V provides, besides rows.h's philox_lanes operations (R, LANES, set1, zero, counters, mul,
// high, xor2, xor3):
//   pair_bits(a, b, thr) -> uint32_t  2 * LANES bits: bit 2i = word a of lane i kept, 2i + 1 = word b
//   spread(x) -> uint32_t             pair i of those bits moved to bits 4i, 4i + 1
//   F, W                              a vector of W floats
//   Mask, keep(bits, k)               the keep decisions of the W columns at k (k % W == 0)
//   load / store of W floats or W bfloat16s (uint16_t bits, stored rounded once), set1f, fmadd,
//   select(m, a, b) (a where kept, else b)
// Most of it is VecLanes below, written once for any register width with GCC / clang vector
// extensions (GCC 12 makes the intrinsics' instructions of them: vpshufd, vpbroadcastd, vpxor,
// vpternlogd, ...). An ISA's traits derive from it and add what differs: mul (GCC makes no
// vpmuludq of a generic 32x32->64 multiply), pair_bits, spread, Mask / keep / select, fmadd (a
// fused multiply-add whatever -ffp-contract says), and the bfloat16 load's widening and store's
// narrowing of 16-bit lanes.
//
// keep_bits: NV = 4 registers of LANES Philox counters per step (4 * LANES * NV columns; four
// independent registers cover the multiply latency), all state in registers; each register's
// words 0/1 and 2/3 become column-order pairs (pair_bits), spread into 4 * LANES column bits.
// The passes: W columns a step, the keep mask from the row's bits, values in registers; the
// last K % W columns take rows.h's scalar loops.
#pragma once
#include <utility>

#include "rows.h"

namespace lorakern {
namespace cpu {
namespace {

// The width-independent lane operations, the base of an ISA's traits V. R_: the register as
// 64-bit lanes (GCC / clang's __v4di, __v8di), U32_: as unsigned 32-bit lanes (__v8su, __v16su),
// F_: as floats (__v8sf, __v16sf); GCC ignores a vector_size that depends on a template
// parameter, so the ISA names them. V adds widen(p) -> U32 (W uint16_t zero-extended) and
// narrow(p, U32) (the low halves of W lanes stored as uint16_t) for the bfloat16 load / store.
template <class V, class R_, class U32_, class F_>
struct VecLanes {
  using R = R_;
  using U32 = U32_;
  using F = F_;
  using I32 = decltype(F{} < F{});  // signed 32-bit lanes (a compare's result)
  static constexpr int LANES = sizeof(R) / 8;
  static constexpr int W = sizeof(F) / 4;

  static R set1(uint32_t x) { return (R)(U32{} + x); }
  static R zero() { return R{}; }
  static R counters(uint64_t c) { return R{} + (long long)c + iota(std::make_index_sequence<LANES>()); }
  // each 64-bit lane's words swapped (pshufd): the high word moved down
  static R high(R a) { return swap_words(a, std::make_index_sequence<2 * LANES>()); }
  static R xor2(R a, R b) { return a ^ b; }
  static R xor3(R a, R b, R c) { return a ^ b ^ c; }
  // rows.h's fold of each 32-bit word, w ^ (w >> 31) (w as int32): < 2^31, so a signed compare
  // of it is the unsigned one
  static R fold(R w) {
    const I32 x = (I32)w;
    return (R)(x ^ (x >> 31));
  }

  static F set1f(float x) { return splat(x, std::make_index_sequence<W>()); }
  static F load(const float* p) {
    F v;
    memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, F v) { memcpy(p, &v, sizeof v); }
  static F load(const uint16_t* p) { return (F)(V::widen(p) << 16); }
  // nearest even, NaN -> 0x7FC0 (rows.h's f32_to_bf16)
  static void store(uint16_t* p, F v) {
    const U32 u = (U32)v;
    V::narrow(p, v == v ? (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16 : U32{} + 0x7FC0u);
  }

 private:
  template <size_t... I>
  static F splat(float x, std::index_sequence<I...>) {
    return F{((void)I, x)...};  // not F{} + x: 0 + -0 is +0
  }
  template <size_t... I>
  static R iota(std::index_sequence<I...>) {
    return R{(long long)I...};
  }
  template <size_t... I>
  static R swap_words(R a, std::index_sequence<I...>) {
#if defined(__clang__)
    return (R)__builtin_shufflevector((U32)a, (U32)a, (I ^ 1)...);
#else
    return (R)__builtin_shuffle((U32)a, U32{(uint32_t)(I ^ 1)...});
#endif
  }
};

template <class V>
struct VecRows {
  static constexpr int NV = 4;
  static constexpr int COLS = 4 * V::LANES;  // columns of one register of counters: 16 or 32
  static_assert(32 % COLS == 0 && (COLS * NV) % 32 == 0, "a step fills whole words of keep bits");

  static void keep_bits(const Stream& s, int64_t row, uint32_t* bits) {
    const int64_t groups = (s.K + 3) / 4;
    const typename V::R thr = V::set1(s.thr);
    for (int64_t k0 = 0; k0 < s.K; k0 += COLS * NV) {
      typename V::R w0[NV], w1[NV], w2[NV], w3[NV];
      philox_lanes<V, NV>(s, (uint64_t)(row * groups + k0 / 4), w0, w1, w2, w3);
      for (int v = 0; v < NV; v += 32 / COLS) {
        uint32_t word = 0;
        for (int u = 0; u < 32 / COLS; ++u)
          word |= (V::spread(V::pair_bits(w0[v + u], w1[v + u], thr)) |
                   V::spread(V::pair_bits(w2[v + u], w3[v + u], thr)) << 2)
                  << (COLS * u);
        bits[(k0 + COLS * v) / 32] = word;
      }
    }
  }

  // T: float, or uint16_t holding bfloat16 bits (rows.h's as_f32 / put_f32)
  template <class T>
  static void mask(const T* src, const uint32_t* bits, float* dst, int64_t K) {
    int64_t k = 0;
    for (; k + V::W <= K; k += V::W) V::store(dst + k, V::select(V::keep(bits, k), V::load(src + k), V::set1f(0.f)));
    mask_from(src, bits, dst, k, K);
  }

  template <class T>
  static void add(T* dst, const float* src, float scale, const uint32_t* bits, int64_t K) {
    const typename V::F sc = V::set1f(scale);
    int64_t k = 0;
    for (; k + V::W <= K; k += V::W) {
      const typename V::F d = V::load(dst + k);
      V::store(dst + k, V::select(V::keep(bits, k), V::fmadd(V::load(src + k), sc, d), d));
    }
    add_from(dst, src, scale, bits, k, K);
  }

  static constexpr Isa table(const char* name) {
    return {name, keep_bits, mask<float>, mask<uint16_t>, add<float>, add<uint16_t>};
  }
};

}  // namespace
}  // namespace cpu
}  // namespace lorakern

// The vector row kernels (rows.h's Isa table) as one template over an instruction set's traits V;
// rows_avx2.cpp and rows_avx512.cpp define V and instantiate it under their own target pragma
// (every function here has internal linkage, as in rows.h: no copy leaks into another file).
//
// V provides, besides rows.h's philox_lanes operations (R, LANES, set1, zero, counters, mul,
// high, xor2, xor3):
//   pair_bits(a, b, thr) -> uint32_t  2 * LANES bits: bit 2i = word a of lane i kept, 2i + 1 = word b
//   spread(x) -> uint32_t             pair i of those bits moved to bits 4i, 4i + 1
//   F, W                              a vector of W floats
//   Mask, keep(bits, k)               the keep decisions of the W columns at k (k % W == 0)
//   load / store of W floats or W bfloat16s (uint16_t bits, stored rounded once), set1f, fmadd,
//   select(m, a, b) (a where kept, else b)
//
// keep_bits: NV = 4 registers of LANES Philox counters per step (4 * LANES * NV columns; four
// independent registers cover the multiply latency), all state in registers; each register's
// words 0/1 and 2/3 become column-order pairs (pair_bits), spread into 4 * LANES column bits.
// The passes: W columns a step, the keep mask from the row's bits, values in registers; the
// last K % W columns take rows.h's scalar loops.
#pragma once
#include "rows.h"

namespace lorakern {
namespace cpu {
namespace {

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

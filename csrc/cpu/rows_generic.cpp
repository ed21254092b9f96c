// The portable row kernels: scalar Philox (csrc/philox.h), one call per four columns, and plain
// loops. Any CPU; the vector tables take over where the CPU has AVX2 or AVX-512.
#include "../philox.h"
#include "rows.h"

namespace lorakern {
namespace cpu {
namespace {

void keep_bits(const Stream& s, int64_t row, uint32_t* bits) {
  const int64_t groups = (s.K + 3) / 4;
  memset(bits, 0, sizeof(uint32_t) * (size_t)bit_words(s.K));
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t w[4];
    philox4(s.seed, (uint64_t)(row * groups + g), w);
    for (int j = 0; j < 4; ++j) {
      const int32_t x = (int32_t)w[j];
      if ((uint32_t)(x ^ (x >> 31)) > s.thr) bits[g >> 3] |= 1u << ((4 * g + j) & 31);
    }
  }
}

template <class T>
void mask(const T* src, const uint32_t* bits, float* dst, int64_t K) {
  mask_from(src, bits, dst, 0, K);
}
template <class T>
void add(T* dst, const float* src, float scale, const uint32_t* bits, int64_t K) {
  add_from(dst, src, scale, bits, 0, K);
}

}  // namespace

const Isa kGeneric = {"generic", keep_bits, mask<float>, mask<uint16_t>, add<float>, add<uint16_t>};

}  // namespace cpu
}  // namespace lorakern

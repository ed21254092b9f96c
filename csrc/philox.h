// Philox-4x32-10 keyed like triton's tl.randint4x(seed, counter) with an int64 counter: counter
// (c & 0xffffffff, c >> 32, 0, 0), key (seed & 0xffffffff, seed >> 32). The dropout stream takes
// four keep decisions from each call: element (row, col) of a [rows, cols] tensor uses word col % 4
// of the call at counter row * ceil(cols / 4) + col / 4, bitcast to int32, x < 0 ? ~x : x, times
// 4.6566127342e-10 (tl.uint_to_uniform_float). Host and device: the CPU tests compile this header
// with a plain C++ compiler and compare against triton's stream.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lorakern {

LK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
#endif
}

// The four output words of one Philox-4x32-10 call.
LK_HD void philox4(uint64_t seed, uint64_t counter, uint32_t (&w)[4]) {
  uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// A Philox word as U[0, 1), exactly as tl.uint_to_uniform_float returns it.
LK_HD float word_uniform(uint32_t word) {
  int32_t x = (int32_t)word;
  x = x < 0 ? ~x : x;
  return (float)x * 4.6566127342e-10f;
}

// The counter of the Philox call that holds element (row, col) of a [rows, cols] tensor: word col % 4.
LK_HD uint64_t keep_counter(int64_t row, int64_t col, int64_t cols) {
  return (uint64_t)(row * ((cols + 3) / 4) + col / 4);
}

// The dropout uniform of element (row, col) of a [rows, cols] tensor (the header comment's stream).
LK_HD float keep_uniform(uint64_t seed, int64_t row, int64_t col, int64_t cols) {
  uint32_t w[4];
  philox4(seed, keep_counter(row, col, cols), w);
  const int j = (int)(col & 3);
  return word_uniform(j == 0 ? w[0] : j == 1 ? w[1] : j == 2 ? w[2] : w[3]);
}

}  // namespace lorakern

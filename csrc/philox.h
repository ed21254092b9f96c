// Philox-4x32-10 keyed like triton's tl.rand(seed, offset) with an int64 offset: counter
// (off & 0xffffffff, off >> 32, 0, 0), key (seed & 0xffffffff, seed >> 32); the first output
// word, bitcast to int32, x < 0 ? ~x : x, times 4.6566127342e-10. Host and device: the CPU
// tests compile this header with a plain C++ compiler and compare against triton's stream.
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

LK_HD uint32_t philox_word0(uint64_t seed, uint64_t off) {
  uint32_t c0 = (uint32_t)off, c1 = (uint32_t)(off >> 32), c2 = 0u, c3 = 0u;
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
  return c0;
}

// U[0, 1) exactly as tl.rand(seed, off) returns it.
LK_HD float philox_uniform(uint64_t seed, uint64_t off) {
  int32_t x = (int32_t)philox_word0(seed, off);
  x = x < 0 ? ~x : x;
  return (float)x * 4.6566127342e-10f;
}

}  // namespace lorakern

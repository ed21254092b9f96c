// Shared device helpers: dtype dispatch, the dropout keep-test and the adapter lookup.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "philox.h"

namespace lorakern {

// Dropout on the adapter branch: element (row, col) of a [rows, cols] tensor is kept iff
// keep_uniform(seed, row, col, cols) > p (philox.h), and kept elements are scaled by inv = 1 / (1 - p).
struct Dropout {
  float p;
  float inv;
  uint64_t seed;
  int64_t cols;  // the row length the counter uses (K of x)
  // The factor for an element whose uniform is u: inv if kept, else 0.
  __device__ __forceinline__ float of(float u) const { return u > p ? inv : 0.f; }
  __device__ __forceinline__ float factor(int64_t row, int64_t col) const {
    if (p <= 0.f) return 1.f;
    return of(keep_uniform(seed, row, col, cols));
  }
  // v[e] *= factor(row, col + e) for VEC consecutive columns; with VEC % 4 == 0 (col % 4 == 0
  // then) one Philox call serves four columns.
  template <int VEC>
  __device__ __forceinline__ void apply(int64_t row, int64_t col, float (&v)[VEC]) const {
    if constexpr (VEC % 4 == 0) {
#pragma unroll
      for (int e = 0; e < VEC; e += 4) {
        uint32_t w[4];
        philox4(seed, keep_counter(row, col + e, cols), w);
#pragma unroll
        for (int j = 0; j < 4; ++j) v[e + j] *= of(word_uniform(w[j]));
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] *= factor(row, col + e);
    }
  }
};

inline Dropout make_dropout(double p, int64_t seed, int64_t cols) {
  return Dropout{(float)p, (float)(1.0 / (1.0 - p)), (uint64_t)seed, cols};
}

// The adapter of row m: 0 without an index; -1 (base only) for -1 or any out-of-range value.
__device__ __forceinline__ int64_t adapter_of(const int64_t* ai, int64_t m, int64_t G) {
  if (ai == nullptr) return 0;
  const int64_t g = ai[m];
  return (g >= 0 && g < G) ? g : -1;
}

// VEC consecutive elements at p as floats: one 16-byte load when VEC > 1 (the caller checks
// stride 1 and 16-byte alignment), a plain load otherwise.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = static_cast<float>(p[0]);
  } else {
    union {
      uint4 u;
      T t[VEC];
    } pack;
    pack.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = static_cast<float>(pack.t[e]);
  }
}

// True when t's data can be read with 16-byte loads along its last dimension from every row.
template <typename T>
bool vec16_ok(const at::Tensor& t) {
  constexpr int V = 16 / sizeof(T);
  if (t.stride(-1) != 1 || t.size(-1) % V != 0) return false;
  for (int d = 0; d + 1 < t.dim(); ++d)
    if (t.stride(d) % V != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr<T>()) % 16 == 0;
}

}  // namespace lorakern

// fp32, fp16 and bf16 only (x's dtype); scalar_t names the element type inside.
#define LK_DISPATCH(TYPE, NAME, ...)                                            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)        \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// Shared device helpers: dtype dispatch (x's type, the adapters' type), the dropout keep-test,
// the adapter lookup and vector loads.
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

// VEC consecutive elements at p as floats: VEC * sizeof(T) / 16 16-byte loads when VEC > 1 (the
// caller checks vec_ok<T, VEC>), a plain load otherwise.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = static_cast<float>(p[0]);
  } else {
    static_assert((VEC * sizeof(T)) % 16 == 0, "VEC elements must fill whole 16-byte loads");
    constexpr int LOADS = VEC * sizeof(T) / 16;
    union {
      uint4 u[LOADS];
      T t[VEC];
    } pack;
#pragma unroll
    for (int l = 0; l < LOADS; ++l) pack.u[l] = reinterpret_cast<const uint4*>(p)[l];
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = static_cast<float>(pack.t[e]);
  }
}

// True when t's data can be read with load_vec<T, VEC> at every multiple of VEC along its last
// dimension, from every row: stride 1 there, whole vectors, 16-byte aligned rows.
template <typename T, int VEC>
bool vec_ok(const at::Tensor& t) {
  static_assert((VEC * sizeof(T)) % 16 == 0, "VEC elements must fill whole 16-byte loads");
  constexpr int ALIGN = 16 / sizeof(T);  // elements per 16 bytes
  if (t.stride(-1) != 1 || t.size(-1) % VEC != 0) return false;
  for (int d = 0; d + 1 < t.dim(); ++d)
    if (t.stride(d) % ALIGN != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr<T>()) % 16 == 0;
}

// Calls f(adapter_t{}) with the adapters' element type (lora_A, lora_B, out_scale as the kernels
// read them): x's scalar_t, or float for fp32 adapters beside a half-precision x (PEFT's default
// precision). One instantiation when scalar_t is float.
template <typename scalar_t, typename F>
void with_adapter_type(at::ScalarType adapters, const char* name, F&& f) {
  if (adapters == c10::CppTypeToScalarType<scalar_t>::value) {
    f(scalar_t{});
  } else {
    TORCH_CHECK(adapters == at::kFloat, name, ": adapters of dtype ", adapters, " beside x of dtype ",
                c10::CppTypeToScalarType<scalar_t>::value, " (expected x's dtype or float32)");
    f(float{});
  }
}

}  // namespace lorakern

// fp32, fp16 and bf16 only (x's dtype); scalar_t names the element type inside.
#define LK_DISPATCH(TYPE, NAME, ...)                                            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)        \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

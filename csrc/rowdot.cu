// rowdot: out[m, r] = sum_k X[m,k] * cs[g,k] * drop(m,k) * A3[g, idx[r], k] in float32.
// Serves the forward shrink (X = x, A3 = lora_A, dropout in-kernel) and the backward
// dt = (g * v) B (X = grad_y, cs = out_scale, A3 = lora_B viewed [G, R, N]).
// X is in x's type T; A3 and cs in the adapters' type TA (T, or float for fp32 adapters beside a
// half-precision x: loaded as fp32, every product and sum in fp32).
// Tiling: one warp per row of X, lanes stride over k, VEC elements at a time (VEC = 16 bytes of
// X: one 16-byte load of X and VEC * sizeof(TA) / 16 of A and cs when all are contiguous along k
// and aligned); RC ranks at a time are accumulated in registers (one float each per lane) and
// reduced across the warp with shuffles, so X is read once per RC active ranks. Rows whose
// adapter is -1 (or out of range) are written as zeros.
#include "common.cuh"
#include "kernels.h"

namespace lorakern {
namespace {

constexpr int RC = 16;    // ranks per pass, in registers
constexpr int WARPS = 8;  // rows per block

template <typename T, typename TA, int VEC>
__global__ void rowdot_kernel(const T* __restrict__ X, int64_t sxm, int64_t sxk, const TA* __restrict__ A,
                              int64_t sag, int64_t sar, int64_t sak, const TA* __restrict__ cs, int64_t csg,
                              int64_t csk, const int64_t* __restrict__ idx, int Ra,
                              const int64_t* __restrict__ ai, int64_t G, float* __restrict__ out, int64_t M,
                              int64_t K, Dropout drop) {
  const int lane = threadIdx.x & 31;
  const int64_t m = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (m >= M) return;
  const int64_t g = adapter_of(ai, m, G);
  float* orow = out + m * Ra;
  if (g < 0) {
    for (int r = lane; r < Ra; r += 32) orow[r] = 0.f;
    return;
  }
  const T* xrow = X + m * sxm;
  const TA* crow = cs == nullptr ? nullptr : cs + g * csg;
  for (int r0 = 0; r0 < Ra; r0 += RC) {
    const int nr = min(RC, Ra - r0);
    const TA* arow[RC];
#pragma unroll
    for (int j = 0; j < RC; ++j) arow[j] = A + g * sag + idx[r0 + (j < nr ? j : 0)] * sar;
    float acc[RC];
#pragma unroll
    for (int j = 0; j < RC; ++j) acc[j] = 0.f;
    for (int64_t k = (int64_t)lane * VEC; k < K; k += 32 * VEC) {
      float xv[VEC];
      load_vec<T, VEC>(xrow + k * sxk, xv);
      if (crow != nullptr) {
        float cv[VEC];
        load_vec<TA, VEC>(crow + k * csk, cv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) xv[e] *= cv[e];
      }
      if (drop.p > 0.f) drop.apply<VEC>(m, k, xv);
#pragma unroll
      for (int j = 0; j < RC; ++j) {
        if (j < nr) {
          float av[VEC];
          load_vec<TA, VEC>(arow[j] + k * sak, av);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j] += xv[e] * av[e];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < RC; ++j) {
      float v = acc[j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == j && j < nr) orow[r0 + j] = v;
    }
  }
}

}  // namespace

void rowdot(const at::Tensor& X, const at::Tensor& A3, const at::Tensor& cs, const at::Tensor& idx,
            const at::Tensor& ai, double p, int64_t seed, at::Tensor& out) {
  const int64_t M = X.size(0), K = X.size(1);
  const int Ra = (int)idx.size(0);
  if (M == 0 || Ra == 0) return;
  const dim3 grid((unsigned)((M + WARPS - 1) / WARPS)), block(WARPS * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH(X.scalar_type(), "lorakern_rowdot", [&] {
    with_adapter_type<scalar_t>(A3.scalar_type(), "lorakern_rowdot", [&](auto a) {
      using adapter_t = decltype(a);
      constexpr int V = 16 / sizeof(scalar_t);
      const bool vec =
          vec_ok<scalar_t, V>(X) && vec_ok<adapter_t, V>(A3) && (!cs.defined() || vec_ok<adapter_t, V>(cs));
      auto launch = [&](auto kernel) {
        kernel<<<grid, block, 0, stream>>>(
            X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), A3.data_ptr<adapter_t>(), A3.stride(0), A3.stride(1),
            A3.stride(2), cs.defined() ? cs.data_ptr<adapter_t>() : nullptr, cs.defined() ? cs.stride(0) : 0,
            cs.defined() ? cs.stride(1) : 0, idx.data_ptr<int64_t>(), Ra,
            ai.defined() ? ai.data_ptr<int64_t>() : nullptr, A3.size(0), out.data_ptr<float>(), M, K,
            make_dropout(p, seed, K));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) launch(rowdot_kernel<scalar_t, adapter_t, V>);
      else launch(rowdot_kernel<scalar_t, adapter_t, 1>);
    });
  });
}

}  // namespace lorakern

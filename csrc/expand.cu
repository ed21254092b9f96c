// expand_add: out[m, c] += drop(m,c) * cs[g,c] * sum_r T[m,r] fac[g,r] B3[g, c, idx[r]].
// Serves the banked forward expand (T = q, fac = s*u, B3 = lora_B, cs = out_scale) and the
// adapter term of dx (T = dq, B3 = lora_A viewed [G, K, R], dropout regenerated).
// out is in x's type T; B3 and cs in the adapters' type TA (T, or float for fp32 adapters beside a
// half-precision x): the adapter term is summed in fp32 and added to out with one rounding.
// Tiling: one thread per column c, ROWS rows per block (grid.x over row tiles, grid.y over
// column tiles). Registers: ROWS accumulators and the RC values B3[g, c, idx[r0..r0+RC)] times
// fac, reloaded only when the adapter changes from one row to the next; T rows are broadcast
// loads. out is read and written once.
#include "common.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace lorakern {
namespace {

constexpr int RC = 16;
constexpr int ROWS = 8;

template <typename T, typename TA>
__global__ void expand_add_kernel(T* __restrict__ out, int64_t som, int64_t soc, int64_t M, int64_t C,
                                  const float* __restrict__ Tm, const float* __restrict__ fac, int64_t sfg,
                                  const TA* __restrict__ B, int64_t sbg, int64_t sbc, int64_t sbr,
                                  const TA* __restrict__ cs, int64_t csg, int64_t csc,
                                  const int64_t* __restrict__ idx, int Ra, const int64_t* __restrict__ ai,
                                  int64_t G, Dropout drop) {
  const int64_t c = (int64_t)blockIdx.y * THREADS + threadIdx.x;
  const int64_t m0 = (int64_t)blockIdx.x * ROWS;
  if (c >= C) return;
  int64_t gr[ROWS];
  float acc[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    gr[i] = m0 + i < M ? adapter_of(ai, m0 + i, G) : -1;
    acc[i] = 0.f;
  }
  for (int r0 = 0; r0 < Ra; r0 += RC) {
    const int nr = min(RC, Ra - r0);
    int64_t gc = -1;
    float bv[RC];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int64_t g = gr[i];
      if (g < 0) continue;
      if (g != gc) {
        gc = g;
#pragma unroll
        for (int j = 0; j < RC; ++j) {
          bv[j] = 0.f;
          if (j < nr) {
            const float f = fac == nullptr ? 1.f : fac[g * sfg + r0 + j];
            bv[j] = f * static_cast<float>(B[g * sbg + c * sbc + idx[r0 + j] * sbr]);
          }
        }
      }
      const float* trow = Tm + (m0 + i) * Ra + r0;
#pragma unroll
      for (int j = 0; j < RC; ++j)
        if (j < nr) acc[i] += trow[j] * bv[j];
    }
  }
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t g = gr[i];
    if (g < 0) continue;
    const int64_t m = m0 + i;
    float v = acc[i] * drop.factor(m, c);
    if (cs != nullptr) v *= static_cast<float>(cs[g * csg + c * csc]);
    T* o = out + m * som + c * soc;
    *o = static_cast<T>(static_cast<float>(*o) + v);
  }
}

// decode: y[m, n] = x[m,:] . W[n,:] + bias[n] + cs[g,n] * sum_r T[m,r] fac[g,r] B3[g, n, idx[r]],
// the whole layer in one launch for a few rows (W is read once from DRAM). x, W, bias, y in x's
// type T; B3 and cs in the adapters' type TA. The base product, bias and adapter term are summed
// in fp32 and rounded once.
// Tiling: one warp per NW consecutive columns (rows of W), rows in chunks of MC; lanes stride
// over k with VEC-element (16-byte when contiguous and aligned) loads. Registers: MC x NW fp32
// accumulators, the VEC-wide slices of x and W. Warp-shuffle reduction, then lane (i, j) adds
// bias and the rank-Ra adapter term for row m0+i, column n0+j and writes y once.
constexpr int MC = 4;
constexpr int NW = 2;
constexpr int DEC_WARPS = 8;

template <typename T, typename TA, int VEC>
__global__ void decode_kernel(const T* __restrict__ x, int64_t sxm, int64_t sxk, const T* __restrict__ W,
                              int64_t swn, int64_t swk, const T* __restrict__ bias, int64_t sb,
                              const float* __restrict__ Tm, const float* __restrict__ fac, int64_t sfg,
                              const TA* __restrict__ B, int64_t sbg, int64_t sbn, int64_t sbr,
                              const TA* __restrict__ cs, int64_t csg, int64_t csn, const int64_t* __restrict__ idx,
                              int Ra, const int64_t* __restrict__ ai, int64_t G, T* __restrict__ y, int64_t M,
                              int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n0 = ((int64_t)blockIdx.x * DEC_WARPS + (threadIdx.x >> 5)) * NW;
  if (n0 >= N) return;
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    float acc[MC][NW];
#pragma unroll
    for (int i = 0; i < MC; ++i)
#pragma unroll
      for (int j = 0; j < NW; ++j) acc[i][j] = 0.f;
    for (int64_t k = (int64_t)lane * VEC; k < K; k += 32 * VEC) {
      float w[NW][VEC];
#pragma unroll
      for (int j = 0; j < NW; ++j) {
        if (n0 + j < N) load_vec<T, VEC>(W + (n0 + j) * swn + k * swk, w[j]);
        else
#pragma unroll
          for (int e = 0; e < VEC; ++e) w[j][e] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < MC; ++i) {
        if (m0 + i >= M) break;
        float xv[VEC];
        load_vec<T, VEC>(x + (m0 + i) * sxm + k * sxk, xv);
#pragma unroll
        for (int j = 0; j < NW; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[i][j] += xv[e] * w[j][e];
      }
    }
    float mine = 0.f;  // lane i * NW + j keeps the total of (row m0+i, column n0+j)
#pragma unroll
    for (int i = 0; i < MC; ++i)
#pragma unroll
      for (int j = 0; j < NW; ++j) {
        float v = acc[i][j];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == i * NW + j) mine = v;
      }
    const int i = lane / NW, j = lane % NW;
    const int64_t m = m0 + i, n = n0 + j;
    if (i < MC && m < M && n < N) {
      if (bias != nullptr) mine += static_cast<float>(bias[n * sb]);
      const int64_t g = adapter_of(ai, m, G);
      if (g >= 0) {
        float s = 0.f;
        for (int r = 0; r < Ra; ++r)
          s += Tm[m * Ra + r] * fac[g * sfg + r] * static_cast<float>(B[g * sbg + n * sbn + idx[r] * sbr]);
        if (cs != nullptr) s *= static_cast<float>(cs[g * csg + n * csn]);
        mine += s;
      }
      y[m * N + n] = static_cast<T>(mine);
    }
  }
}

}  // namespace

void expand_add(at::Tensor& out, const at::Tensor& T, const at::Tensor& fac, const at::Tensor& B3,
                const at::Tensor& cs, const at::Tensor& idx, const at::Tensor& ai, double p, int64_t seed) {
  const int64_t M = out.size(0), C = out.size(1);
  const int Ra = (int)idx.size(0);
  if (M == 0 || C == 0 || Ra == 0) return;
  const dim3 grid(num_blocks(M, ROWS), num_blocks(C, THREADS)), block(THREADS);
  auto stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH(out.scalar_type(), "lorakern_expand_add", [&] {
    with_adapter_type<scalar_t>(B3.scalar_type(), "lorakern_expand_add", [&](auto a) {
      using adapter_t = decltype(a);
      expand_add_kernel<scalar_t, adapter_t><<<grid, block, 0, stream>>>(
          out.data_ptr<scalar_t>(), out.stride(0), out.stride(1), M, C, T.data_ptr<float>(),
          fac.defined() ? fac.data_ptr<float>() : nullptr, fac.defined() ? fac.stride(0) : 0,
          B3.data_ptr<adapter_t>(), B3.stride(0), B3.stride(1), B3.stride(2),
          cs.defined() ? cs.data_ptr<adapter_t>() : nullptr, cs.defined() ? cs.stride(0) : 0,
          cs.defined() ? cs.stride(1) : 0, idx.data_ptr<int64_t>(), Ra,
          ai.defined() ? ai.data_ptr<int64_t>() : nullptr, B3.size(0), make_dropout(p, seed, C));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void decode(const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias, const at::Tensor& T,
            const at::Tensor& fac, const at::Tensor& B3, const at::Tensor& cs, const at::Tensor& idx,
            const at::Tensor& ai, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0);
  if (M == 0 || N == 0) return;
  const int64_t warps = (N + NW - 1) / NW;
  const dim3 grid(num_blocks(warps, DEC_WARPS)), block(DEC_WARPS * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH(x.scalar_type(), "lorakern_decode", [&] {
    with_adapter_type<scalar_t>(B3.scalar_type(), "lorakern_decode", [&](auto a) {
      using adapter_t = decltype(a);
      constexpr int V = 16 / sizeof(scalar_t);
      const bool vec = vec_ok<scalar_t, V>(x) && vec_ok<scalar_t, V>(W);
      auto launch = [&](auto kernel) {
        kernel<<<grid, block, 0, stream>>>(
            x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), W.data_ptr<scalar_t>(), W.stride(0), W.stride(1),
            bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, bias.defined() ? bias.stride(0) : 0,
            T.data_ptr<float>(), fac.data_ptr<float>(), fac.stride(0), B3.data_ptr<adapter_t>(), B3.stride(0),
            B3.stride(1), B3.stride(2), cs.defined() ? cs.data_ptr<adapter_t>() : nullptr,
            cs.defined() ? cs.stride(0) : 0, cs.defined() ? cs.stride(1) : 0, idx.data_ptr<int64_t>(),
            (int)idx.size(0), ai.defined() ? ai.data_ptr<int64_t>() : nullptr, B3.size(0),
            y.data_ptr<scalar_t>(), M, N, K);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) launch(decode_kernel<scalar_t, adapter_t, V>);
      else launch(decode_kernel<scalar_t, adapter_t, 1>);
    });
  });
}

}  // namespace lorakern

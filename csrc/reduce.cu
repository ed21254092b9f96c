// reduce_rows: out[g, c, r] += sum over rows m of adapter g of drop(m,c) * X[m,c] * T[m,r].
// Serves g^T t per adapter (X = grad_y, T = t; gives dB and dv) and dA = dq^T x~ with the
// dropout mask regenerated (X = x, T = dq) wherever a plain GEMM cannot (banks, dropout).
// Tiling: one thread per column c; grid.x over column tiles, grid.y over chunks of `chunk` rows
// (CHUNK, or all M rows when one_slice) visited in `order` (sorted by adapter, so a chunk holds
// few adapters). With one chunk a thread's atomicAdds to an element are its own, issued in
// order: the sum is deterministic. Registers: RC fp32 accumulators for ranks r0..r0+RC,
// flushed to out with atomicAdd when the adapter changes and at the end of the chunk. T rows are broadcast loads; X is read once per RC ranks.
// keep_mask: bool [M, K], the keep-mask the kernels use, one thread per element.
#include "common.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace lorakern {
namespace {

constexpr int RC = 16;
constexpr int CHUNK = 128;

template <typename T>
__global__ void reduce_rows_kernel(const T* __restrict__ X, int64_t sxm, int64_t sxc, int64_t M, int64_t C,
                                   const float* __restrict__ Tm, int Ra, const int64_t* __restrict__ ai,
                                   const int64_t* __restrict__ order, int64_t G, float* __restrict__ out,
                                   Dropout drop, int64_t chunk) {
  const int64_t c = (int64_t)blockIdx.x * THREADS + threadIdx.x;
  if (c >= C) return;
  const int64_t i0 = (int64_t)blockIdx.y * chunk;
  const int64_t i1 = min(i0 + chunk, M);
  for (int r0 = 0; r0 < Ra; r0 += RC) {
    const int nr = min(RC, Ra - r0);
    float acc[RC];
    int64_t gc = -1;
    auto flush = [&]() {
      if (gc < 0) return;
      float* o = out + (gc * C + c) * Ra + r0;
#pragma unroll
      for (int j = 0; j < RC; ++j)
        if (j < nr) atomicAdd(o + j, acc[j]);
    };
#pragma unroll
    for (int j = 0; j < RC; ++j) acc[j] = 0.f;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = order == nullptr ? i : order[i];
      const int64_t g = adapter_of(ai, m, G);
      if (g < 0) continue;
      if (g != gc) {
        flush();
        gc = g;
#pragma unroll
        for (int j = 0; j < RC; ++j) acc[j] = 0.f;
      }
      const float xv = static_cast<float>(X[m * sxm + c * sxc]) * drop.factor(m, c);
      const float* trow = Tm + m * Ra + r0;
#pragma unroll
      for (int j = 0; j < RC; ++j)
        if (j < nr) acc[j] += xv * trow[j];
    }
    flush();
  }
}

__global__ void keep_mask_kernel(bool* __restrict__ out, int64_t total, Dropout drop) {
  const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e < total) out[e] = drop.factor(e / drop.cols, e % drop.cols) != 0.f;
}

}  // namespace

void reduce_rows(const at::Tensor& X, const at::Tensor& T, const at::Tensor& ai, const at::Tensor& order,
                 double p, int64_t seed, bool one_slice, at::Tensor& out) {
  const int64_t M = X.size(0), C = X.size(1);
  const int Ra = (int)T.size(1);
  if (M == 0 || C == 0 || Ra == 0) return;
  const int64_t chunk = one_slice ? M : CHUNK;
  const dim3 grid(num_blocks(C, THREADS), num_blocks(M, chunk)), block(THREADS);
  auto stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH(X.scalar_type(), "lorakern_reduce_rows", [&] {
    reduce_rows_kernel<scalar_t><<<grid, block, 0, stream>>>(
        X.data_ptr<scalar_t>(), X.stride(0), X.stride(1), M, C, T.data_ptr<float>(), Ra,
        ai.defined() ? ai.data_ptr<int64_t>() : nullptr, order.defined() ? order.data_ptr<int64_t>() : nullptr,
        out.size(0), out.data_ptr<float>(), make_dropout(p, seed, C), chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor keep_mask(int64_t seed, int64_t M, int64_t K, double p, c10::Device device) {
  auto out = at::empty({M, K}, at::TensorOptions().dtype(at::kBool).device(device));
  const int64_t total = M * K;
  if (total == 0) return out;
  keep_mask_kernel<<<num_blocks(total, THREADS), THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<bool>(), total, make_dropout(p, seed, K));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace lorakern

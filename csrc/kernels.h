// Launchers of the csrc kernels (one .cu file each, so they build in parallel). Tensors arrive
// checked by ops.cpp. Conventions: "3-D views" are [G, rows, cols] with any strides (a 2-D
// weight is passed as unsqueeze(0)); `cs` is a per-column scale [Gc, cols] with Gc in {1, G}
// (stride 0 where shared) or undefined; `fac` is float32 [Gc, Ra] likewise; `idx` int64 [Ra]
// the active ranks; `ai` int64 [M] adapter per row or undefined (rows with -1 or an
// out-of-range adapter get no adapter term). Dtypes: X, out, x, W, bias, y in x's; the adapter
// views A3 / B3 and `cs` in the adapters' dtype (x's, or float32 beside a float16 / bfloat16 x:
// read as fp32, the adapter term computed in fp32 and rounded once into out / y).
#pragma once
#include <ATen/ATen.h>

namespace lorakern {

// out[m, r] = sum_k X[m,k] cs[g,k] drop(m,k) A3[g, idx[r], k], float32 [M, Ra] (shrink; dt).
void rowdot(const at::Tensor& X, const at::Tensor& A3, const at::Tensor& cs, const at::Tensor& idx,
            const at::Tensor& ai, double p, int64_t seed, at::Tensor& out);

// out[m, c] += drop(m,c) cs[g,c] sum_r T[m,r] fac[g,r] B3[g, c, idx[r]] (banked expand; dx's adapter term).
void expand_add(at::Tensor& out, const at::Tensor& T, const at::Tensor& fac, const at::Tensor& B3,
                const at::Tensor& cs, const at::Tensor& idx, const at::Tensor& ai, double p, int64_t seed);

// y[m, n] = sum_k x[m,k] W[n,k] + bias[n] + cs[g,n] sum_r T[m,r] fac[g,r] B3[g, n, idx[r]], small M (the op uses it for M <= 4).
void decode(const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias, const at::Tensor& T,
            const at::Tensor& fac, const at::Tensor& B3, const at::Tensor& cs, const at::Tensor& idx,
            const at::Tensor& ai, at::Tensor& y);

// out[g, c, r] += sum over rows m of adapter g of drop(m,c) X[m,c] T[m,r]; out float32 [Gc, cols, Ra]
// zero-initialised; rows visited in `order` (int64 [M], e.g. sorted by adapter) or 0..M-1.
// one_slice: all rows in one block per column tile, so each element gets its adds in a fixed
// order (deterministic; fewer blocks).
void reduce_rows(const at::Tensor& X, const at::Tensor& T, const at::Tensor& ai, const at::Tensor& order,
                 double p, int64_t seed, bool one_slice, at::Tensor& out);

// bool [M, K]: the keep-mask the kernels use.
at::Tensor keep_mask(int64_t seed, int64_t M, int64_t K, double p, c10::Device device);

}  // namespace lorakern

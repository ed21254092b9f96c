// The lorakern_cuda op library: schemas, argument checks (mirroring lorakern/ops.py, each
// naming the argument, what was expected and what was given) and the forward/backward
// orchestration over cuBLAS (through ATen) and the kernels of kernels.h. fp32 adapters beside a
// float16 / bfloat16 x: cuBLAS computes only the base products (in x's dtype), the kernels the
// whole adapter branch in fp32 (compiled, not yet run on a GPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "kernels.h"

namespace lorakern {
namespace {

using at::Tensor;
using std::optional;

constexpr int64_t DECODE_MAX_M = 4;  // rows up to which the forward is one fused launch after the shrink (one MC chunk)

std::string shape_of(const Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_on(const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), " (that of x), got ", t.device());
}

// t on x's device, of dtype `want` or `alt` (alt == want: `want` alone); `whose` says where they come from.
void check_dtype(const char* name, const Tensor& t, const Tensor& x, at::ScalarType want, at::ScalarType alt,
                 const char* whose) {
  check_on(name, t, x);
  const auto dt = t.scalar_type();
  if (alt == want) {
    TORCH_CHECK(dt == want, name, ": expected dtype ", want, " (", whose, "), got ", dt);
  } else {
    TORCH_CHECK(dt == want || dt == alt, name, ": expected dtype ", want, " or ", alt, " (", whose, "), got ", dt);
  }
}

void check_float(const char* name, const Tensor& t, const Tensor& x) {
  check_dtype(name, t, x, x.scalar_type(), x.scalar_type(), "that of x");
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// fp32 adapters beside a float16 / bfloat16 x (PEFT's default precision): the adapter branch is
// computed in fp32 and added to the base product with one rounding to x's dtype.
bool mixed(const Tensor& lora_A, const Tensor& x) { return lora_A.scalar_type() != x.scalar_type(); }

void check_shape(const char* name, const Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, name, ": expected shape ", want, ", got ", shape_of(t));
}

// A per-rank or per-column vector: [len] or, with a bank of G adapters, [G, len]; its dtype x's
// or the adapters' (`adapters`).
void check_vector(const char* name, const optional<Tensor>& t, int64_t len, bool banked, int64_t G, const Tensor& x,
                  at::ScalarType adapters) {
  if (!t.has_value()) return;
  check_dtype(name, *t, x, x.scalar_type(), adapters, "that of x or of lora_A");
  if (banked && t->dim() == 2) check_shape(name, *t, {G, len});
  else check_shape(name, *t, {len});
}

// Everything the op's kernels read, checked before any of them runs. Returns (M, K, N, R, G).
struct Dims {
  int64_t M, K, N, R, G, Ra;
  bool banked;
};

Dims check_args(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias, const Tensor& A, const Tensor& B,
                const optional<Tensor>& scaling_g, const optional<Tensor>& rank_scale,
                const optional<Tensor>& rank_idx, const optional<Tensor>& out_scale, double p,
                const optional<Tensor>& adapter_index, bool validate) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got device ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "x: expected dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [M, K], got shape ", shape_of(x));
  check_float("weight", weight, x);
  TORCH_CHECK(weight.dim() == 2, "weight: expected a 2-D tensor [N, K], got shape ", shape_of(weight));
  Dims d{};
  d.M = x.size(0);
  d.K = x.size(1);
  d.N = weight.size(0);
  TORCH_CHECK(weight.size(1) == d.K, "weight: expected shape [N, ", d.K, "] (K of x), got ", shape_of(weight));
  if (bias.has_value()) {
    check_float("bias", *bias, x);
    check_shape("bias", *bias, {d.N});
  }
  // lora_A: x's dtype, or float32 beside a half-precision x; lora_B: lora_A's
  const bool half = is_half(dt);
  check_dtype("lora_A", A, x, dt, half ? at::kFloat : dt,
              half ? "that of x, or float32 beside a half-precision x" : "that of x");
  check_dtype("lora_B", B, x, A.scalar_type(), A.scalar_type(), "that of lora_A");
  TORCH_CHECK(A.dim() == 2 || A.dim() == 3, "lora_A: expected [R, K] or [G, R, K], got shape ", shape_of(A));
  d.banked = A.dim() == 3;
  d.G = d.banked ? A.size(0) : 1;
  d.R = A.size(-2);
  TORCH_CHECK(d.R >= 1, "lora_A: expected rank R >= 1, got shape ", shape_of(A));
  TORCH_CHECK(A.size(-1) == d.K, "lora_A: expected last dimension ", d.K, " (K of x), got shape ", shape_of(A));
  if (d.banked) check_shape("lora_B", B, {d.G, d.N, d.R});
  else check_shape("lora_B", B, {d.N, d.R});
  if (scaling_g.has_value()) {
    check_on("scaling_g", *scaling_g, x);
    TORCH_CHECK(scaling_g->scalar_type() == at::kFloat, "scaling_g: expected dtype float32, got ",
                scaling_g->scalar_type());
    check_shape("scaling_g", *scaling_g, {d.G});
  }
  check_vector("rank_scale", rank_scale, d.R, d.banked, d.G, x, A.scalar_type());
  check_vector("out_scale", out_scale, d.N, d.banked, d.G, x, A.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p: expected a float in [0, 1), got ", p);
  d.Ra = d.R;
  if (rank_idx.has_value()) {
    const Tensor& ri = *rank_idx;
    check_on("rank_idx", ri, x);
    TORCH_CHECK(ri.scalar_type() == at::kLong, "rank_idx: expected dtype int64, got ", ri.scalar_type());
    TORCH_CHECK(ri.dim() == 1 && ri.size(0) >= 1 && ri.size(0) <= d.R, "rank_idx: expected shape [Ra] with 1 <= Ra <= ",
                d.R, ", got ", shape_of(ri));
    d.Ra = ri.size(0);
    if (validate) {
      auto mm = at::aminmax(ri);
      const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < d.R, "rank_idx: expected values in [0, ", d.R, "), got ", lo < 0 ? lo : hi);
    }
  }
  if (d.banked) {
    TORCH_CHECK(adapter_index.has_value(), "adapter_index: required with banked lora_A ", shape_of(A), ", got None");
  } else {
    TORCH_CHECK(!adapter_index.has_value(), "adapter_index: given, so lora_A must be a bank [G, R, K], got shape ",
                shape_of(A));
  }
  if (adapter_index.has_value()) {
    const Tensor& ai = *adapter_index;
    check_on("adapter_index", ai, x);
    TORCH_CHECK(ai.scalar_type() == at::kLong, "adapter_index: expected dtype int64, got ", ai.scalar_type());
    check_shape("adapter_index", ai, {d.M});
    if (validate && d.M > 0) {
      auto mm = at::aminmax(ai);
      const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
      TORCH_CHECK(lo >= -1 && hi < d.G, "adapter_index: expected values in [-1, ", d.G, "), got ", lo < -1 ? lo : hi);
    }
  }
  TORCH_CHECK(d.M <= (int64_t)65535 * 128, "x: at most ", (int64_t)65535 * 128, " rows, got ", d.M);
  return d;
}

// The base scale c [N] (DoRA's magnitude ratio): same dtype and device as x.
void check_base_scale(const optional<Tensor>& c, const Dims& d, const Tensor& x) {
  if (!c.has_value()) return;
  check_float("base_scale", *c, x);
  check_shape("base_scale", *c, {d.N});
}

Tensor active_ranks(const optional<Tensor>& rank_idx, const Dims& d, const Tensor& x) {
  return rank_idx.has_value() ? rank_idx->contiguous()
                              : at::arange(d.R, at::TensorOptions().dtype(at::kLong).device(x.device()));
}

// s * u over the active ranks, float32 [Gc, Ra] with Gc = G when anything is per adapter
// (returned expanded: stride 0 over adapters when shared).
Tensor rank_factor(double scaling, const optional<Tensor>& scaling_g, const optional<Tensor>& rank_scale,
                   const Tensor& idx, const Dims& d, const Tensor& x) {
  const double s = scaling_g.has_value() ? 1.0 : scaling;  // scaling is ignored when scaling_g is given
  Tensor f = rank_scale.has_value() ? rank_scale->index_select(-1, idx).to(at::kFloat) * s
                                    : at::full({d.Ra}, s, x.options().dtype(at::kFloat));
  if (scaling_g.has_value()) f = f * scaling_g->view({d.G, 1});
  if (f.dim() == 1) f = f.unsqueeze(0);
  return f.contiguous().expand({d.G, d.Ra});
}

// A per-column vector as [Gc, len] (stride 0 over adapters when it is [len]) in the adapters'
// dtype (the kernels read it beside lora_B; a half-precision one beside fp32 adapters is widened,
// exactly), or undefined.
Tensor per_column(const optional<Tensor>& v, const Dims& d, const Tensor& lora_A) {
  if (!v.has_value()) return Tensor();
  const Tensor w = v->to(lora_A.scalar_type());
  return w.dim() == 1 ? w.unsqueeze(0).expand({d.G, w.size(0)}) : w;
}

Tensor as_bank(const Tensor& t) { return t.dim() == 2 ? t.unsqueeze(0) : t; }

Tensor optional_or_undefined(const optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                                   const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                   const optional<Tensor>& scaling_g, const optional<Tensor>& rank_scale,
                                   const optional<Tensor>& rank_idx, const optional<Tensor>& out_scale,
                                   double dropout_p, int64_t seed, const optional<Tensor>& adapter_index,
                                   const optional<Tensor>& base_scale, bool deterministic, bool validate) {
  const Dims d = check_args(x, weight, bias, lora_A, lora_B, scaling_g, rank_scale, rank_idx, out_scale, dropout_p,
                            adapter_index, validate);
  check_base_scale(base_scale, d, x);
  (void)deterministic;  // the forward has no reduction across threads: always deterministic
  c10::cuda::CUDAGuard guard(x.device());
  Tensor q = at::empty({d.M, d.Ra}, x.options().dtype(at::kFloat));
  if (d.M == 0) return {at::empty({0, d.N}, x.options()), q};
  const Tensor idx = active_ranks(rank_idx, d, x);
  const Tensor ai = optional_or_undefined(adapter_index);
  const Tensor fac = rank_factor(scaling, scaling_g, rank_scale, idx, d, x);
  const Tensor v = per_column(out_scale, d, lora_A);
  rowdot(x, as_bank(lora_A), Tensor(), idx, ai, dropout_p, seed, q);
  if (d.M <= DECODE_MAX_M && !base_scale.has_value()) {
    Tensor y = at::empty({d.M, d.N}, x.options());
    decode(x, weight, optional_or_undefined(bias), q, fac, as_bank(lora_B), v, idx, ai, y);
    return {y, q};
  }
  Tensor y;
  if (base_scale.has_value()) {
    y = at::mm(x, weight.t()).mul_(*base_scale);
    if (bias.has_value()) y.add_(*bias);
  } else {
    y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  }
  // banks, and fp32 adapters beside a half-precision x (the update summed in fp32, added to the
  // base product with one rounding, as PEFT): the expand kernel; one adapter in x's dtype: cuBLAS
  if (d.banked || mixed(lora_A, x)) {
    expand_add(y, q, fac, as_bank(lora_B), v, idx, ai, 0.0, 0);
  } else {
    Tensor Bv = lora_B.index_select(1, idx);
    if (out_scale.has_value()) Bv = Bv * out_scale->unsqueeze(1);
    y.addmm_((q * fac[0]).to(x.scalar_type()), Bv.t());
  }
  return {y, q};
}

std::vector<Tensor> backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                             const Tensor& lora_B, double scaling, const optional<Tensor>& scaling_g,
                             const optional<Tensor>& rank_scale, const optional<Tensor>& rank_idx,
                             const optional<Tensor>& out_scale, double dropout_p, int64_t seed,
                             const optional<Tensor>& adapter_index, const optional<Tensor>& base_scale,
                             const Tensor& q, at::IntArrayRef needs_in, bool deterministic, bool validate) {
  const Dims d = check_args(x, weight, std::nullopt, lora_A, lora_B, scaling_g, rank_scale, rank_idx, out_scale,
                            dropout_p, adapter_index, validate);
  check_base_scale(base_scale, d, x);
  check_float("grad_y", grad_y, x);
  check_shape("grad_y", grad_y, {d.M, d.N});
  check_on("q", q, x);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "q: expected dtype float32, got ", q.scalar_type());
  check_shape("q", q, {d.M, d.Ra});
  TORCH_CHECK(needs_in.size() == 8,
              "needs: expected 8 flags (x, weight, bias, lora_A, lora_B, rank_scale, out_scale, base_scale), got ",
              needs_in.size());
  const bool n_x = needs_in[0], n_w = needs_in[1], n_b = needs_in[2], n_A = needs_in[3], n_B = needs_in[4],
             n_u = needs_in[5] && rank_scale.has_value(), n_v = needs_in[6] && out_scale.has_value(),
             n_c = needs_in[7] && base_scale.has_value();
  c10::cuda::CUDAGuard guard(x.device());
  const auto fopt = x.options().dtype(at::kFloat);
  std::vector<Tensor> out(8, at::empty({0}, x.options()));
  const Tensor& g = grad_y;
  const Tensor qc = q.contiguous();
  const Tensor idx = active_ranks(rank_idx, d, x);
  const Tensor ai = optional_or_undefined(adapter_index);
  const Tensor fac = rank_factor(scaling, scaling_g, rank_scale, idx, d, x);
  const Tensor v = per_column(out_scale, d, lora_A);
  const bool dropout = dropout_p > 0.0;
  // One adapter in x's dtype: its skinny products by cuBLAS in x's dtype. Banks, and fp32 adapters
  // beside a half-precision x: the kernels (adapters read as fp32, every adapter product summed in
  // fp32; dA, dB, du, dv in the adapters' dtype, dx's adapter term added with one rounding).
  const bool gemm = !d.banked && !mixed(lora_A, x);
  // Per-row views of the adapter factors; rows with no adapter get 0 (so t, dq vanish there).
  Tensor valid, gi;
  if (d.banked) {
    valid = (ai >= 0).logical_and(ai < d.G);
    gi = ai.clamp(0, d.G - 1);
  }
  const Tensor fac_rows = d.banked ? fac.index_select(0, gi) * valid.unsqueeze(1) : fac[0].unsqueeze(0);

  Tensor dq;
  if (n_x || n_A || n_u) {
    Tensor dt = at::empty({d.M, d.Ra}, fopt);
    rowdot(g, as_bank(lora_B).transpose(1, 2), v, idx, ai, 0.0, 0, dt);  // dt = (g * v) B
    dq = dt * fac_rows;
    if (n_u) {
      Tensor s_rows = scaling_g.has_value() ? (d.banked ? scaling_g->index_select(0, gi) * valid : *scaling_g)
                                            : at::full({d.M}, scaling, fopt);
      if (d.banked && !scaling_g.has_value()) s_rows = s_rows * valid;
      const Tensor w = dt * qc * s_rows.unsqueeze(1);
      // per adapter by a GEMM with the rows' one-hot adapter matrix (index_add_'s atomics would
      // sum in a varying order)
      Tensor du_act = rank_scale->dim() == 1
                          ? w.sum(0)
                          : at::mm(at::zeros({d.G, d.M}, fopt).scatter_(0, gi.unsqueeze(0), 1.0), w);
      out[5] = at::zeros(rank_scale->sizes(), fopt).index_copy_(-1, idx, du_act).to(rank_scale->scalar_type());
    }
  }
  // the base path's upstream gradient g * c
  const Tensor gc = base_scale.has_value() && (n_x || n_w) ? g * *base_scale : g;
  if (n_x) {
    Tensor dx = at::mm(gc, weight);
    if (gemm && !dropout) dx.addmm_(dq.to(x.scalar_type()), lora_A.index_select(0, idx));
    else expand_add(dx, dq, Tensor(), as_bank(lora_A).transpose(1, 2), Tensor(), idx, ai, dropout_p, seed);
    out[0] = dx;
  }
  if (n_w) out[1] = at::mm(gc.t(), x);
  if (n_b) out[2] = g.sum(0);
  if (n_c) out[7] = at::mm(x, weight.t()).mul_(g).sum(0, false, at::kFloat).to(base_scale->scalar_type());
  // stable, so that the rows of each adapter are visited in the same order on every call
  const Tensor order = d.banked ? at::argsort(ai, /*stable=*/true) : Tensor();
  if (n_A) {
    Tensor dA_act;  // [Gc, Ra, K]
    if (gemm && !dropout) {
      dA_act = at::mm(dq.t().to(x.scalar_type()), x).unsqueeze(0);
    } else {
      Tensor acc = at::zeros({d.G, d.K, d.Ra}, fopt);
      reduce_rows(x, dq.contiguous(), ai, order, dropout_p, seed, deterministic, acc);
      dA_act = acc.transpose(1, 2);
    }
    Tensor dA = at::zeros({d.G, d.R, d.K}, lora_A.options());
    dA.index_copy_(1, idx, dA_act.to(lora_A.scalar_type()));
    out[3] = d.banked ? dA : dA[0];
  }
  if (n_B || n_v) {
    const Tensor t = qc * fac_rows;
    Tensor P;  // g^T t per adapter, float32 [Gc, N, Ra]
    if (gemm) {
      P = at::mm(g.t(), t.to(x.scalar_type())).to(at::kFloat).unsqueeze(0);
    } else {
      P = at::zeros({d.G, d.N, d.Ra}, fopt);
      reduce_rows(g, t.contiguous(), ai, order, 0.0, 0, deterministic, P);
    }
    if (n_B) {
      Tensor dB_act = v.defined() ? P * v.unsqueeze(2).to(at::kFloat) : P;
      Tensor dB = at::zeros({d.G, d.N, d.R}, lora_B.options());
      dB.index_copy_(2, idx, dB_act.to(lora_B.scalar_type()));
      out[4] = d.banked ? dB : dB[0];
    }
    if (n_v) {
      Tensor dv = (P * as_bank(lora_B).index_select(2, idx).to(at::kFloat)).sum(2);  // [Gc, N]
      out[6] = (out_scale->dim() == 1 ? dv.sum(0) : dv).to(out_scale->scalar_type());
    }
  }
  return out;
}

Tensor dropout_keep(int64_t seed, int64_t M, int64_t K, double p, c10::Device device) {
  TORCH_CHECK(device.is_cuda(), "device: expected a CUDA device, got ", device);
  TORCH_CHECK(M >= 0 && K >= 0, "M, K: expected non-negative sizes, got ", M, ", ", K);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p: expected a float in [0, 1), got ", p);
  c10::cuda::CUDAGuard guard(device);
  return keep_mask(seed, M, K, p, device);
}

}  // namespace
}  // namespace lorakern

TORCH_LIBRARY(lorakern_cuda, m) {
  m.def(
      "forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "Tensor? scaling_g, Tensor? rank_scale, Tensor? rank_idx, Tensor? out_scale, float dropout_p, int seed, "
      "Tensor? adapter_index, Tensor? base_scale, bool deterministic, bool validate=True) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, "
      "Tensor? scaling_g, Tensor? rank_scale, Tensor? rank_idx, Tensor? out_scale, float dropout_p, int seed, "
      "Tensor? adapter_index, Tensor? base_scale, Tensor q, int[] needs, bool deterministic, bool validate=True) "
      "-> Tensor[]");
  // no tensor argument to dispatch on: a catch-all kernel
  m.def("dropout_keep(int seed, int M, int K, float dropout_p, Device device) -> Tensor", &lorakern::dropout_keep);
}

// CompositeExplicitAutograd: every argument is checked here, so a CPU tensor gets a clear error
// (not a dispatcher "no kernel for CPU") and the CUDA work runs on x's device.
TORCH_LIBRARY_IMPL(lorakern_cuda, CompositeExplicitAutograd, m) {
  m.impl("forward", &lorakern::forward);
  m.impl("backward", &lorakern::backward);
}

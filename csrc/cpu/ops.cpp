// lorakern._lorakern_cpu: the adapter branch's masked passes on CPUs, with the dropout keep-mask
// made in SIMD lanes from the Philox stream (rows.h) and never stored: x~ = x * keep / (1 - p).
//
// torch.ops.lorakern_cpu:
//   shrink(x, A, rows, p, seed) -> q          q [m, Ra] f32 = x~[rows] A^T
//   add_masked_(dx, dq, A, rows, p, seed)     dx[rows] += (dq A) * keep / (1 - p), in place
//   masked_At(dq, x, rows, p, seed) -> dA     dA [Ra, K] f32 = dq^T x~[rows]
//   masked_At_add_(dx, dq, x, A, rows, p, seed) -> dA   both of the above in one pass (dx [M, K] like x)
//   dropout(x, p, seed) -> x~                 x~ [M, K] in x's dtype, contiguous (M x K written)
//   dropout_keep(seed, M, K, p) -> keep       bool [M, K]: keep[r, k] = U > p (for tests)
//   isa(name="") -> str, isas() -> str[]      the row kernels' instruction set: read, or force one
//
// x and dx are [M, K] float32 or bfloat16 with any strides; A [Ra, K] in x's dtype or float32;
// dq [m, Ra] float32; rows an optional int64 [m] of rows of x (without it, m = M and row i is
// row i). The keep decision of a row always comes from its own row number in x, so a caller may
// split a batch into row groups (one per adapter) and call once per group. p = 0 means no dropout.
//
// shrink, add_masked_, masked_At and masked_At_add_ stream over row blocks of `bm` rows
// (block_rows: 256 KB of f32, in L2), the blocks split over at::parallel_for's threads. Per
// worker: one f32 buffer [bm, K] and the keep bits (rows.h) of a block's rows. The rank-Ra
// products run in BLAS (at::mm_out / at::addmm_out) on a block at a time. dropout and
// dropout_keep go row by row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "rows.h"

namespace lorakern {
namespace cpu {
namespace {

using at::Tensor;

// f32 elements of a worker's row-block buffer: 256 KB, within L2 on current x86 cores (measured
// on one: 1 << 14 .. 1 << 17 elements, bigger is 5-20% faster at K = 2048, about even at K = 256)
constexpr int64_t kBlockElems = 1 << 16;

int64_t block_rows(int64_t K) { return std::max<int64_t>(1, kBlockElems / std::max<int64_t>(K, 1)); }

// ------------------------------------------------------------------------- instruction sets

std::vector<const Isa*> supported_isas() {
  std::vector<const Isa*> out;
#ifdef LORAKERN_CPU_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2"))
    out.push_back(&kAvx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(&kAvx2);
#endif
  out.push_back(&kGeneric);
  return out;
}

const std::vector<const Isa*>& isas_here() {
  static const std::vector<const Isa*> all = supported_isas();
  return all;
}

std::atomic<const Isa*>& current_isa() {
  static std::atomic<const Isa*> isa{isas_here().front()};
  return isa;
}

// The current instruction set's name; with a name, selects that one (one the CPU runs) and
// returns the previous one's name.
std::string select_isa(const std::string& name) {
  const Isa* before = current_isa().load();
  if (name.empty()) return before->name;
  const Isa* found = nullptr;
  std::string names;
  for (const Isa* i : isas_here()) {
    if (name == i->name) found = i;
    names += (names.empty() ? "" : ", ") + std::string(i->name);
  }
  TORCH_CHECK(found != nullptr, "name: expected an instruction set this CPU runs (", names, "), got '", name, "'");
  current_isa().store(found);
  return before->name;
}

std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (const Isa* i : isas_here()) out.emplace_back(i->name);
  return out;
}

// ------------------------------------------------------------------------- the dropout stream

// The largest t in [0, 2^31) whose uniform (float32 t * 2^-31, tl.uint_to_uniform_float) is <= p:
// U(word) > p iff fold(word) > t (rows.h).
uint32_t threshold(float p) {
  int64_t lo = 0, hi = (int64_t{1} << 31) - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if ((float)mid * 4.6566127342e-10f <= p)
      lo = mid;
    else
      hi = mid - 1;
  }
  return (uint32_t)lo;
}

Stream make_stream(int64_t seed, double p, int64_t K) {
  Stream s;
  s.seed = (uint64_t)seed;
  uint32_t k0 = (uint32_t)s.seed, k1 = (uint32_t)(s.seed >> 32);
  for (int r = 0; r < 10; ++r, k0 += 0x9E3779B9u, k1 += 0xBB67AE85u) {
    s.k0[r] = k0;
    s.k1[r] = k1;
  }
  s.thr = threshold((float)p);
  s.K = K;
  return s;
}

// A worker's view of the keep-mask: the keep bits of up to `slots` rows (all ones without dropout).
struct Keep {
  const Isa* isa;
  const Stream* stream;  // null: no dropout
  int64_t words;
  std::vector<uint32_t> bits;

  Keep(const Isa* isa, const Stream* stream, int64_t K, int64_t slots)
      : isa(isa), stream(stream), words(bit_words(K)), bits((size_t)(words * slots), stream ? 0u : ~0u) {}
  // Row r's bits, made into `slot` (where they stay until the slot is made again).
  const uint32_t* row(int64_t r, int64_t slot) {
    uint32_t* b = bits.data() + slot * words;
    if (stream) isa->keep_bits(*stream, r, b);
    return b;
  }
  const uint32_t* made(int64_t slot) const { return bits.data() + slot * words; }
};

// Runs body(keep, buf, i0, n) over the blocks of block_rows(K) rows of [0, m) (rows i0 .. i0 + n),
// the blocks split over at::parallel_for's threads; each worker has its own Keep (the mask's
// stream, or none, with a slot per row of a block) and one f32 buffer [bm, K].
template <typename Body>
void for_row_blocks(int64_t m, int64_t K, const Isa* isa, const Stream* stream, Body&& body) {
  const int64_t bm = block_rows(K), nb = (m + bm - 1) / bm;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    const at::NoGradGuard no_grad;  // grad mode is per thread: on in a fresh worker
    Keep keep(isa, stream, K, bm);
    Tensor buf = at::empty({bm, K}, at::TensorOptions().dtype(at::kFloat));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * bm;
      body(keep, buf, i0, std::min(bm, m - i0));
    }
  });
}

// ------------------------------------------------------------------------- argument checks

void check_x(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D tensor [M, K], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              ": expected dtype float32 or bfloat16, got ", t.scalar_type());
}

void check_dropout(double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected a float in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "seed: expected a non-negative int, got ", seed);
}

// A as f32 [Ra, K], contiguous (a copy only when it is not already), times `scale` when != 1.
Tensor adapter_f32(const Tensor& A, const Tensor& like, int64_t K, const char* like_name, double scale) {
  TORCH_CHECK(A.device().is_cpu(), "A: expected a CPU tensor, got device ", A.device());
  TORCH_CHECK(A.dim() == 2 && A.size(1) == K, "A: expected shape [Ra, ", K, "] (K of ", like_name, "), got ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == like.scalar_type() || A.scalar_type() == at::kFloat, "A: expected dtype ",
              like.scalar_type(), " (that of ", like_name, ") or float32, got ", A.scalar_type());
  const Tensor a = A.to(at::kFloat).contiguous();
  return scale == 1.0 ? a : a * scale;
}

void check_dq(const Tensor& dq, int64_t m, int64_t Ra) {
  TORCH_CHECK(dq.device().is_cpu(), "dq: expected a CPU tensor, got device ", dq.device());
  TORCH_CHECK(dq.scalar_type() == at::kFloat, "dq: expected dtype float32, got ", dq.scalar_type());
  TORCH_CHECK(dq.dim() == 2 && dq.size(0) == m && (Ra < 0 || dq.size(1) == Ra), "dq: expected shape [", m, ", ",
              Ra < 0 ? std::string("Ra") : std::to_string(Ra), "], got ", dq.sizes());
}

// The rows a call reads: rows[i] when given (checked: int64 [m] in [0, M), and distinct when the
// call writes them), else i.
struct Rows {
  const int64_t* idx = nullptr;
  int64_t m;
  Tensor keep_alive;
  int64_t operator[](int64_t i) const { return idx ? idx[i] : i; }
};

Rows make_rows(const c10::optional<Tensor>& rows, int64_t M, bool distinct) {
  if (!rows.has_value()) return Rows{nullptr, M, Tensor()};
  const Tensor& r = *rows;
  TORCH_CHECK(r.device().is_cpu(), "rows: expected a CPU tensor, got device ", r.device());
  TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1, "rows: expected an int64 1-D tensor, got ",
              r.scalar_type(), " of shape ", r.sizes());
  Rows out{nullptr, r.numel(), r.contiguous()};
  out.idx = out.keep_alive.data_ptr<int64_t>();
  for (int64_t i = 0; i < out.m; ++i)
    TORCH_CHECK(out.idx[i] >= 0 && out.idx[i] < M, "rows: expected values in [0, ", M, "), got ", out.idx[i],
                " at position ", i);
  if (distinct) {
    std::vector<int64_t> sorted(out.idx, out.idx + out.m);
    std::sort(sorted.begin(), sorted.end());
    const auto twice = std::adjacent_find(sorted.begin(), sorted.end());
    TORCH_CHECK(twice == sorted.end(), "rows: expected distinct rows (dx is written there), got ", *twice,
                " twice");
  }
  return out;
}

// ------------------------------------------------------------------------- row access

// Row r of x [M, K] (f32 or bf16, any strides) times its keep bits, as f32 into dst [K].
void load_row(const Tensor& x, int64_t r, const uint32_t* bits, float* dst, const Isa* isa) {
  const int64_t K = x.size(1), sk = x.stride(1);
  if (x.scalar_type() == at::kFloat) {
    const float* src = x.const_data_ptr<float>() + r * x.stride(0);
    if (sk == 1) return isa->mask_f32(src, bits, dst, K);
    for (int64_t k = 0; k < K; ++k) dst[k] = src[k * sk];
  } else {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()) + r * x.stride(0);
    if (sk == 1) return isa->mask_bf16(src, bits, dst, K);
    for (int64_t k = 0; k < K; ++k) dst[k] = bf16_to_f32(src[k * sk]);
  }
  isa->mask_f32(dst, bits, dst, K);
}

// dx row r += scale * v where kept (v [K] f32; dx f32 or bf16, any strides; v may be overwritten).
void add_row(const Tensor& dx, int64_t r, float* v, float scale, const uint32_t* bits, const Isa* isa) {
  const int64_t K = dx.size(1), sk = dx.stride(1);
  if (dx.scalar_type() == at::kFloat) {
    float* d = dx.data_ptr<float>() + r * dx.stride(0);
    if (sk == 1) return isa->add_f32(d, v, scale, bits, K);
    isa->mask_f32(v, bits, v, K);
    for (int64_t k = 0; k < K; ++k) d[k * sk] += scale * v[k];
  } else {
    uint16_t* d = reinterpret_cast<uint16_t*>(dx.data_ptr<at::BFloat16>()) + r * dx.stride(0);
    if (sk == 1) return isa->add_bf16(d, v, scale, bits, K);
    isa->mask_f32(v, bits, v, K);
    for (int64_t k = 0; k < K; ++k) d[k * sk] = f32_to_bf16(bf16_to_f32(d[k * sk]) + scale * v[k]);
  }
}

// x~[rows[i0 .. i0 + n)] into buf [n, K], times the keep bits (the 1 / (1 - p) is the caller's);
// row i0 + i's bits stay in keep's slot i.
void load_block(const Tensor& x, const Rows& rows, int64_t i0, int64_t n, Keep& keep, Tensor& buf) {
  const int64_t K = x.size(1);
  float* b = buf.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[i0 + i];
    load_row(x, r, keep.row(r, i), b + i * K, keep.isa);
  }
}

// ------------------------------------------------------------------------- the ops

// shrink: q = x~[rows] A^T. Per block of bm rows: the masked rows into the worker's f32 buffer
// (keep bits per row in L1, x read once), then q[block] = buf A'^T in one BLAS call, A' = A / (1 - p)
// as f32 (made once, Ra x K). Blocks are independent: any thread count gives the same bits.
Tensor shrink(const Tensor& x, const Tensor& A, const c10::optional<Tensor>& rows, double p, int64_t seed) {
  check_x(x, "x");
  check_dropout(p, seed);
  const int64_t M = x.size(0), K = x.size(1);
  const Tensor a = adapter_f32(A, x, K, "x", p > 0 ? 1.0 / (1.0 - p) : 1.0);
  const Rows rs = make_rows(rows, M, false);
  const int64_t m = rs.m, Ra = a.size(0);
  Tensor q = at::empty({m, Ra}, x.options().dtype(at::kFloat));
  if (m == 0) return q;
  if (K == 0) return q.zero_();
  const Stream s = make_stream(seed, p, K);
  const Isa* isa = current_isa().load();
  const Tensor aT = a.t();
  for_row_blocks(m, K, isa, p > 0 ? &s : nullptr, [&](Keep& keep, Tensor& buf, int64_t i0, int64_t n) {
    load_block(x, rs, i0, n, keep, buf);
    Tensor qb = q.narrow(0, i0, n);
    at::mm_out(qb, buf.narrow(0, 0, n), aT);
  });
  return q;
}

// add_masked_: dx[rows] += (dq A) * keep / (1 - p). Per block of bm rows: buf = dq[block] A in one
// BLAS call (f32), then per row the keep bits and a masked multiply-add into dx's row (one
// rounding for bf16). Rows are distinct (checked), so blocks never write the same row.
void add_masked_(const Tensor& dx, const Tensor& dq, const Tensor& A, const c10::optional<Tensor>& rows, double p,
                 int64_t seed) {
  check_x(dx, "dx");
  check_dropout(p, seed);
  const int64_t M = dx.size(0), K = dx.size(1);
  const Tensor a = adapter_f32(A, dx, K, "dx", 1.0);
  const Rows rs = make_rows(rows, M, true);
  const int64_t m = rs.m;
  check_dq(dq, m, a.size(0));
  if (m == 0 || K == 0 || a.size(0) == 0) return;
  const Stream s = make_stream(seed, p, K);
  const Isa* isa = current_isa().load();
  const float scale = (float)(1.0 / (1.0 - p));
  const Tensor d = dq.contiguous();
  for_row_blocks(m, K, isa, p > 0 ? &s : nullptr, [&](Keep& keep, Tensor& buf, int64_t i0, int64_t n) {
    Tensor vb = buf.narrow(0, 0, n);
    at::mm_out(vb, d.narrow(0, i0, n), a);
    float* v = buf.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = rs[i0 + i];
      add_row(dx, r, v + i * K, scale, keep.row(r, i), isa);
    }
  });
}

// masked_At (dx undefined): dA = dq^T x~[rows]; masked_At_add_ also dx[rows] += (dq A) * keep / (1 - p)
// in the same pass (each row's keep bits made once). The blocks are split into T = min(threads,
// blocks) contiguous chunks fixed by (m, T); chunk c sums its blocks in order into its own [Ra, K]
// partial (chunk 0 into the output), and the partials are added in chunk order: bitwise the same
// dA on every run with the same thread count. Per block of bm rows: the masked rows into the
// worker's f32 buffer (their bits kept in the worker's slots), one BLAS call dA_c += dq[block]^T buf
// (1 / (1 - p) as its alpha); with dx, then buf = dq[block] A (BLAS) and per row a masked
// multiply-add into dx's row from the kept bits. Rows are distinct when dx is written (checked).
Tensor masked_grads(const Tensor& dq, const Tensor& x, const c10::optional<Tensor>& rows, double p, int64_t seed,
                    const Tensor& dx, const Tensor& A) {
  check_x(x, "x");
  check_dropout(p, seed);
  const bool add = dx.defined();
  const int64_t M = x.size(0), K = x.size(1);
  if (add) {
    check_x(dx, "dx");
    TORCH_CHECK(dx.sizes() == x.sizes(), "dx: expected shape ", x.sizes(), " (that of x), got ", dx.sizes());
  }
  const Rows rs = make_rows(rows, M, add);
  const int64_t m = rs.m;
  check_dq(dq, m, -1);
  const int64_t Ra = dq.size(1);
  const Tensor a = add ? adapter_f32(A, x, K, "x", 1.0) : Tensor();
  if (add) check_dq(dq, m, a.size(0));
  Tensor out = at::empty({Ra, K}, dq.options());
  if (m == 0 || K == 0 || Ra == 0) return out.zero_();
  const Stream s = make_stream(seed, p, K);
  const Isa* isa = current_isa().load();
  const double alpha = p > 0 ? 1.0 / (1.0 - p) : 1.0;
  const Tensor dT = dq.t();
  const int64_t bm = block_rows(K), nb = (m + bm - 1) / bm;
  const int64_t chunks = std::min<int64_t>(nb, at::get_num_threads());
  Tensor partial = at::empty({chunks - 1, Ra, K}, out.options());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const at::NoGradGuard no_grad;  // grad mode is per thread: on in a fresh worker
    Keep keep(isa, p > 0 ? &s : nullptr, K, bm);
    Tensor buf = at::empty({bm, K}, out.options());
    for (int64_t c = c0; c < c1; ++c) {
      Tensor acc = c == 0 ? out : partial[c - 1];
      for (int64_t b = nb * c / chunks; b < nb * (c + 1) / chunks; ++b) {
        const int64_t i0 = b * bm, n = std::min(bm, m - i0);
        Tensor bn = buf.narrow(0, 0, n);
        load_block(x, rs, i0, n, keep, buf);
        at::addmm_out(acc, acc, dT.narrow(1, i0, n), bn, b == nb * c / chunks ? 0.0 : 1.0, alpha);
        if (!add) continue;
        at::mm_out(bn, dq.narrow(0, i0, n), a);
        float* v = buf.data_ptr<float>();
        for (int64_t i = 0; i < n; ++i) add_row(dx, rs[i0 + i], v + i * K, (float)alpha, keep.made(i), isa);
      }
    }
  });
  for (int64_t c = 1; c < chunks; ++c) out.add_(partial[c - 1]);
  return out;
}

Tensor masked_At(const Tensor& dq, const Tensor& x, const c10::optional<Tensor>& rows, double p, int64_t seed) {
  return masked_grads(dq, x, rows, p, seed, Tensor(), Tensor());
}

Tensor masked_At_add_(const Tensor& dx, const Tensor& dq, const Tensor& x, const Tensor& A,
                      const c10::optional<Tensor>& rows, double p, int64_t seed) {
  TORCH_CHECK(dx.defined(), "dx: expected a tensor");
  return masked_grads(dq, x, rows, p, seed, dx, A);
}

// dropout: x~ = x * keep / (1 - p), a new contiguous tensor in x's dtype (for callers that want x~
// itself; the cpu backend's passes never write it: bench/cpu_kernels.py times both ways). Per row: its keep bits, the masked
// row as f32 (into the output row for f32 x, else a row buffer), times 1 / (1 - p) (rounded once
// to bf16 for bf16 x).
Tensor dropout(const Tensor& x, double p, int64_t seed) {
  check_x(x, "x");
  check_dropout(p, seed);
  const int64_t M = x.size(0), K = x.size(1);
  Tensor out = at::empty({M, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || K == 0) return out;
  const Stream s = make_stream(seed, p, K);
  const Isa* isa = current_isa().load();
  const float inv = (float)(1.0 / (1.0 - p));
  const bool f32 = x.scalar_type() == at::kFloat;
  at::parallel_for(0, M, block_rows(K), [&](int64_t r0, int64_t r1) {
    Keep keep(isa, p > 0 ? &s : nullptr, K, 1);
    std::vector<float> row(f32 ? 0 : (size_t)K);
    for (int64_t r = r0; r < r1; ++r) {
      if (f32) {
        float* o = out.data_ptr<float>() + r * K;
        load_row(x, r, keep.row(r, 0), o, isa);
        for (int64_t k = 0; k < K; ++k) o[k] *= inv;
      } else {
        uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + r * K;
        load_row(x, r, keep.row(r, 0), row.data(), isa);
        for (int64_t k = 0; k < K; ++k) o[k] = f32_to_bf16(row[k] * inv);
      }
    }
  });
  return out;
}

Tensor dropout_keep(int64_t seed, int64_t M, int64_t K, double p) {
  check_dropout(p, seed);
  TORCH_CHECK(M >= 0 && K >= 0, "M, K: expected non-negative sizes, got ", M, ", ", K);
  Tensor out = at::empty({M, K}, at::TensorOptions().dtype(at::kBool));
  if (M == 0 || K == 0) return out;
  const Stream s = make_stream(seed, p, K);
  const Isa* isa = current_isa().load();
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, M, block_rows(K), [&](int64_t r0, int64_t r1) {
    Keep keep(isa, &s, K, 1);
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* bits = keep.row(r, 0);
      for (int64_t k = 0; k < K; ++k) o[r * K + k] = kept(bits, k);
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace lorakern

TORCH_LIBRARY(lorakern_cpu, m) {
  m.def("shrink(Tensor x, Tensor A, Tensor? rows, float p, int seed) -> Tensor");
  m.def("add_masked_(Tensor(a!) dx, Tensor dq, Tensor A, Tensor? rows, float p, int seed) -> ()");
  m.def("masked_At(Tensor dq, Tensor x, Tensor? rows, float p, int seed) -> Tensor");
  m.def("masked_At_add_(Tensor(a!) dx, Tensor dq, Tensor x, Tensor A, Tensor? rows, float p, int seed) -> Tensor");
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
  m.def("dropout_keep(int seed, int M, int K, float p) -> Tensor", &lorakern::cpu::dropout_keep);
  m.def("isa(str name='') -> str", &lorakern::cpu::select_isa);
  m.def("isas() -> str[]", &lorakern::cpu::isas);
}

// CompositeExplicitAutograd: the checks above run for any device, so a CUDA tensor gets an error
// naming the argument (not the dispatcher's "no kernel for CUDA").
TORCH_LIBRARY_IMPL(lorakern_cpu, CompositeExplicitAutograd, m) {
  m.impl("shrink", &lorakern::cpu::shrink);
  m.impl("add_masked_", &lorakern::cpu::add_masked_);
  m.impl("masked_At", &lorakern::cpu::masked_At);
  m.impl("masked_At_add_", &lorakern::cpu::masked_At_add_);
  m.impl("dropout", &lorakern::cpu::dropout);
}

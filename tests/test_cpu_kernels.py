"""The CPU extension's kernels (csrc/cpu/, ``lorakern.cpu_ext``) on every instruction set this CPU runs.

The keep-mask bit for bit against the pure-torch Philox of test_cuda.py (seeds and counters past
2**32, K not a multiple of 4, p = 0) and, in the ``interpret`` tier, against the triton backend's
masks; each kernel against a float64 computation with that mask (fp32 and bf16, M = 1, primes,
strided and transposed x, row subsets, several row blocks and threads); masked_At bitwise
repeatable, and masked_At_add_ bitwise masked_At plus add_masked_; the errors that name the argument; no compiler -> unavailable with a one-line reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cpu_ext_cannot_build
from lorakern import cpu_ext
from lorakern.testing import randn, randn_view, rel_err, strided_copy
from test_cuda import _torch_keep_uniform

# one thread (conftest): torch's own ops here are tiny and, on a busy shared machine, every
# parallel region waits for a second thread; test_threads_give_the_same_bits runs two
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
ISAS = ["avx512", "avx2", "generic"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}  # the kernels compute in f32 from bf16 inputs


@pytest.fixture(scope="module")
def ops():
    ok, why = cpu_ext.available()
    if not ok:
        if not cpu_ext_cannot_build(why):
            pytest.fail(f"the CPU extension is {why}")  # a toolchain is here: it must build and load
        pytest.skip(f"the CPU extension is {why}")
    return cpu_ext.ops()


@pytest.fixture(params=ISAS)
def isa(request, ops):
    """Each instruction set the CPU runs, selected for the test and restored after it."""
    if request.param not in ops.isas():
        pytest.skip(f"this CPU does not run {request.param}")
    before = ops.isa(request.param)
    yield request.param
    ops.isa(before)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh draws per test, reproducible from its name."""
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _keep(ops, seed, M, K, p):
    """The kernels' keep-mask (test_keep_matches_torch_philox checks it bit for bit); all kept for
    p = 0 (the kernels' no-dropout)."""
    if p == 0:
        return torch.ones(M, K, dtype=torch.bool)
    return ops.dropout_keep(seed, M, K, p)


def _x(gen, M, K, dtype, layout):
    if layout == "contiguous":
        return randn(gen, M, K, dtype=dtype)
    if layout == "transposed":
        return randn_view(gen, M, K, layout="transposed", dtype=dtype)
    return randn_view(gen, M, K, layout="columns", dtype=dtype)


def _rows(gen, M, kind):
    if kind == "all":
        return None
    return torch.randperm(M, generator=gen)[: max(1, (2 * M) // 3)]


# --------------------------------------------------------------------------- the keep-mask


SEEDS = [0, 1, 12345, 2**31 - 2, 2**32 + 3, 2**40 + 5, 2**62 - 1]
MASK_SHAPES = [(7, 1), (5, 13), (3, 64), (2, 127), (4, 128), (3, 301), (2, 1031)]


@pytest.mark.parametrize("seed", SEEDS)
def test_keep_matches_torch_philox(ops, isa, seed):
    for M, K in MASK_SHAPES:
        u = _torch_keep_uniform(seed, M, K)
        for p in (0.0, 0.1, 0.5, 0.9):
            assert torch.equal(ops.dropout_keep(seed, M, K, p), u > p), (isa, seed, M, K, p)
    frac = ops.dropout_keep(seed, 64, 999, 0.3).float().mean().item()
    assert 0.67 < frac < 0.73


def test_keep_errors(ops):
    with pytest.raises(RuntimeError, match=r"p: expected a float in \[0, 1\), got 1"):
        ops.dropout_keep(1, 2, 3, 1.0)
    with pytest.raises(RuntimeError, match="seed: expected a non-negative int, got -1"):
        ops.dropout_keep(-1, 2, 3, 0.1)
    with pytest.raises(RuntimeError, match="M, K: expected non-negative sizes, got -2, 3"):
        ops.dropout_keep(1, -2, 3, 0.1)
    with pytest.raises(RuntimeError, match=r"name: expected an instruction set this CPU runs \(.*generic\), got 'sse9'"):
        ops.isa("sse9")


@pytest.mark.interpret
def test_keep_matches_triton_interpreter(ops, isa):
    """The triton backend's keep-mask, run by the interpreter, against the kernels' (same seeds, shapes, p)."""
    from lorakern.triton.dropout import dropout_keep

    for seed in (7, 2**31 - 2, 2**40 + 5):
        for M, K in ((9, 1), (5, 13), (4, 130), (3, 257)):
            for p in (0.1, 0.5):
                assert torch.equal(ops.dropout_keep(seed, M, K, p), dropout_keep(seed, M, K, p, "cpu")), \
                    (isa, seed, M, K, p)


def test_counters_past_2_32(ops, isa, gen):
    """Rows whose counters pass 2**32 (a stride-0 x of 2**34 rows): every kernel's mask is the stream's."""
    K, Ra, p, seed = 301, 3, 0.4, 2**40 + 5
    M = 2**34
    row = randn(gen, 1, K)
    x = row.expand(M, K)
    rows = torch.tensor([2**34 - 1, 2**33 // 76 + 1, 2**32 // 76 + 5, 3])  # ceil(K / 4) = 76
    keep = torch.cat([_torch_keep_uniform(seed, 1, K, int(r)) > p for r in rows])
    xk = row.double() * keep / (1 - p)
    A = randn(gen, Ra, K)
    assert rel_err(ops.shrink(x, A, rows, p, seed), xk @ A.double().T) < TOL[torch.float32]
    dq = randn(gen, len(rows), Ra)
    assert rel_err(ops.masked_At(dq, x, rows, p, seed), dq.double().T @ xk) < TOL[torch.float32]
    base = randn(gen, 1, K)
    for r, k in zip(rows.tolist(), keep):
        dx = base.clone().as_strided((M, K), (0, 1))  # every row is the one row in memory
        ops.add_masked_(dx, dq[:1], A, torch.tensor([r]), p, seed)
        want = base.double() + (dq[:1].double() @ A.double()) * k / (1 - p)
        assert rel_err(dx[0:1], want) < TOL[torch.float32]


# --------------------------------------------------------------------------- the kernels

# (M, K, Ra): M = 1, primes, K off every multiple of 4 / 16 / 128, Ra = 1, and several row blocks
# (a block is 2**16 // K rows: 2 at K = 301 and K = 1031, 3 at K = 64)
SHAPES = [(1, 16, 4), (7, 13, 5), (1, 1, 1), (431, 301, 16), (150, 1031, 8), (2100, 64, 3)]
CASES = [(dt, layout, rows) for dt in (torch.float32, torch.bfloat16)
         for layout, rows in (("contiguous", "all"), ("contiguous", "subset"), ("transposed", "subset"),
                              ("columns", "all"))]


def _case_id(c):
    return f"{str(c[0])[6:]}-{c[1]}-{c[2]}"


def _draws(gen, dtype, layout, rows_kind):
    """(M, K, Ra, seed, x [M, K] in ``layout``, A [Ra, K], rows) for each of SHAPES, fresh."""
    for M, K, Ra in SHAPES:
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        yield (M, K, Ra, seed, _x(gen, M, K, dtype, layout), randn(gen, Ra, K, dtype=dtype),
               _rows(gen, M, rows_kind))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,layout,rows_kind", CASES, ids=[_case_id(c) for c in CASES])
def test_shrink(ops, isa, gen, dtype, layout, rows_kind, p):
    for M, K, Ra, seed, x, A, rows in _draws(gen, dtype, layout, rows_kind):
        xk = x.double() * _keep(ops, seed, M, K, p) / (1 - p)
        want = (xk if rows is None else xk[rows]) @ A.double().T
        q = ops.shrink(x, A, rows, p, seed)
        assert q.dtype == torch.float32 and q.shape == want.shape
        assert rel_err(q, want) < TOL[dtype], (M, K, Ra)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,layout,rows_kind", CASES, ids=[_case_id(c) for c in CASES])
def test_add_masked(ops, isa, gen, dtype, layout, rows_kind, p):
    for M, K, Ra, seed, dx, A, rows in _draws(gen, dtype, layout, rows_kind):
        before = dx.double()
        m = M if rows is None else len(rows)
        dq = randn(gen, m, Ra)
        keep = _keep(ops, seed, M, K, p)
        want = before.clone()
        idx = torch.arange(M) if rows is None else rows
        want[idx] += (dq.double() @ A.double()) * keep[idx] / (1 - p)
        ops.add_masked_(dx, dq, A, rows, p, seed)
        # bf16 dx: one rounding of the f32 sum per element
        tol = 4e-3 if dtype == torch.bfloat16 else TOL[dtype]
        assert rel_err(dx, want) < tol, (M, K, Ra)
        untouched = torch.ones(M, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(dx.double()[untouched], before[untouched])


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,layout,rows_kind", CASES, ids=[_case_id(c) for c in CASES])
def test_masked_At(ops, isa, gen, dtype, layout, rows_kind, p):
    """masked_At against float64; masked_At_add_ (one pass, each row's mask made once) gives its dA
    and add_masked_'s dx, bit for bit."""
    for M, K, Ra, seed, x, A, rows in _draws(gen, dtype, layout, rows_kind):
        m = M if rows is None else len(rows)
        dq = randn(gen, m, Ra)
        xk = x.double() * _keep(ops, seed, M, K, p) / (1 - p)
        want = dq.double().T @ (xk if rows is None else xk[rows])
        dA = ops.masked_At(dq, x, rows, p, seed)
        assert dA.dtype == torch.float32 and dA.shape == (Ra, K)
        assert rel_err(dA, want) < TOL[dtype], (M, K, Ra)
        dx = _x(gen, M, K, dtype, layout)
        want_dx = torch.empty_strided(dx.shape, dx.stride(), dtype=dtype).copy_(dx)  # dx's layout: the same row passes
        ops.add_masked_(want_dx, dq, A, rows, p, seed)
        assert torch.equal(ops.masked_At_add_(dx, dq, x, A, rows, p, seed), dA), (M, K, Ra)
        assert torch.equal(dx, want_dx), (M, K, Ra)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,layout", [(dt, lay) for dt in (torch.float32, torch.bfloat16)
                                          for lay in ("contiguous", "transposed", "columns")])
def test_dropout(ops, isa, gen, dtype, layout, p):
    for M, K, _ in SHAPES:
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        x = _x(gen, M, K, dtype, layout)
        out = ops.dropout(x, p, seed)
        assert out.dtype == dtype and out.is_contiguous()
        want = x.double() * _keep(ops, seed, M, K, p) / (1 - p)
        # bf16: x / (1 - p) rounded once
        assert rel_err(out, want) < (4e-3 if dtype == torch.bfloat16 else TOL[dtype]), (M, K)
        assert torch.equal(out == 0, want == 0)


def test_threads_give_the_same_bits(ops, gen):
    """shrink, add_masked_ and dropout: the same bits on 1 and 2 threads (blocks are independent);
    masked_At: the same bits on every run per thread count (fixed chunks, partials summed in order)."""
    M, K, Ra, p = 1000, 301, 16, 0.1  # 5 row blocks
    x, A, dq = randn(gen, M, K), randn(gen, Ra, K), randn(gen, M, Ra)
    rows = torch.randperm(M, generator=gen)[:700]

    def run():
        dx = x.clone()
        ops.add_masked_(dx, dq[:700], A, rows, p, 99)
        return ops.shrink(x, A, rows, p, 99), dx, ops.dropout(x, p, 99), ops.dropout_keep(99, M, K, p)

    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = run()
            first = ops.masked_At(dq, x, None, p, 99)
            for _ in range(3):
                assert torch.equal(ops.masked_At(dq, x, None, p, 99), first)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[2]))


def test_strided_A_and_dq(ops, gen):
    """A as a strided view (a bank slice, column-major) and a non-contiguous dq give the same values."""
    M, K, Ra, p, seed = 37, 70, 6, 0.2, 5
    x, A, dq = randn(gen, M, K), randn(gen, Ra, K), randn(gen, M, Ra)
    for As in (strided_copy(A, "columns"), strided_copy(A, "column_major")):
        assert torch.equal(ops.shrink(x, As, None, p, seed), ops.shrink(x, A, None, p, seed))
        d1, d2 = x.clone(), x.clone()
        ops.add_masked_(d1, strided_copy(dq, "column_major"), As, None, p, seed)
        ops.add_masked_(d2, dq, A, None, p, seed)
        assert torch.equal(d1, d2)
    assert torch.equal(ops.masked_At(strided_copy(dq, "columns"), x, None, p, seed),
                       ops.masked_At(dq, x, None, p, seed))


def test_inputs_that_require_grad(ops, gen):
    """Several row blocks (K = 40000: one row each) on worker threads, whose grad mode is on, with
    inputs that require grad: no autograd error from the BLAS calls, the same values."""
    x, A, dq = randn(gen, 3, 40000), randn(gen, 2, 40000), randn(gen, 3, 2)
    want = (ops.shrink(x, A, None, 0.2, 3), ops.masked_At(dq, x, None, 0.2, 3))
    x.requires_grad_(), A.requires_grad_(), dq.requires_grad_()
    assert torch.equal(ops.shrink(x, A, None, 0.2, 3), want[0])
    assert torch.equal(ops.masked_At(dq, x, None, 0.2, 3), want[1])
    dx = torch.zeros(3, 40000)
    ops.add_masked_(dx, dq, A, None, 0.2, 3)
    assert dx.abs().sum() > 0


def test_empty(ops, gen):
    x, A = randn(gen, 5, 8), randn(gen, 3, 8)
    none = torch.empty(0, dtype=torch.int64)
    assert ops.shrink(x, A, none, 0.1, 1).shape == (0, 3)
    assert torch.equal(ops.masked_At(torch.empty(0, 3), x, none, 0.1, 1), torch.zeros(3, 8))
    dx = x.clone()
    ops.add_masked_(dx, torch.empty(0, 3), A, none, 0.1, 1)
    assert torch.equal(dx, x)
    assert ops.dropout_keep(1, 0, 5, 0.1).shape == (0, 5)
    assert ops.dropout(x[:0], 0.1, 1).shape == (0, 8)


def test_errors_name_the_argument(ops, gen):
    x, A, dq = randn(gen, 5, 13), randn(gen, 3, 13), randn(gen, 5, 3)
    cases = [
        (lambda: ops.shrink(x.double(), A, None, 0.1, 1), "x: expected dtype float32 or bfloat16, got Double"),
        (lambda: ops.shrink(x[0], A, None, 0.1, 1), r"x: expected a 2-D tensor \[M, K\], got shape \[13\]"),
        (lambda: ops.shrink(x, A[:, :12], None, 0.1, 1), r"A: expected shape \[Ra, 13\] \(K of x\), got \[3, 12\]"),
        (lambda: ops.shrink(x, A.half(), None, 0.1, 1), r"A: expected dtype Float \(that of x\) or float32, got Half"),
        (lambda: ops.shrink(x, A, torch.tensor([0, 5]), 0.1, 1), r"rows: expected values in \[0, 5\), got 5"),
        (lambda: ops.shrink(x, A, torch.tensor([0, 1], dtype=torch.int32), 0.1, 1),
         "rows: expected an int64 1-D tensor, got Int"),
        (lambda: ops.shrink(x, A, None, -0.1, 1), r"p: expected a float in \[0, 1\)"),
        (lambda: ops.add_masked_(x.clone(), dq, A, torch.tensor([1, 2, 1]), 0.1, 1), "rows: expected distinct rows"),
        (lambda: ops.add_masked_(x.clone(), dq[:4], A, None, 0.1, 1), r"dq: expected shape \[5, 3\], got \[4, 3\]"),
        (lambda: ops.add_masked_(x.clone(), dq.double(), A, None, 0.1, 1), "dq: expected dtype float32, got Double"),
        (lambda: ops.masked_At(dq, x, torch.tensor([0, 1]), 0.1, 1), r"dq: expected shape \[2, Ra\], got \[5, 3\]"),
        (lambda: ops.masked_At_add_(x[:4].clone(), dq, x, A, None, 0.1, 1),
         r"dx: expected shape \[5, 13\] \(that of x\), got \[4, 13\]"),
        (lambda: ops.masked_At_add_(x.clone(), dq[:3], x, A, torch.tensor([1, 2, 1]), 0.1, 1),
         "rows: expected distinct rows"),
        (lambda: ops.masked_At_add_(x.clone(), dq[:, :2], x, A, None, 0.1, 1), r"dq: expected shape \[5, 3\], got \[5, 2\]"),
        (lambda: ops.add_masked_(x.bfloat16(), dq, A.half(), None, 0.1, 1),
         r"A: expected dtype BFloat16 \(that of dx\) or float32, got Half"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_no_compiler_is_one_line(tmp_path):
    """No C++ compiler and nothing built: unavailable, with the reason in one line."""
    code = "from lorakern import cpu_ext; print(repr(cpu_ext.available()))"
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path),
               PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ok, why = eval(r.stdout.strip().splitlines()[-1])
    assert not ok and why == f"unavailable: no C++ compiler found ({tmp_path / 'no-such-c++'}; set CXX)"


# --------------------------------------------------------------------------- the cpu backend (the op's suite
# runs it through conftest's cases; here: the registered ops and torch.compile)


def test_backend_opcheck(ops, gen):
    from lorakern.ops import _bwd, _fwd

    x, W, A, B = randn(gen, 6, 10), randn(gen, 8, 10), randn(gen, 4, 10), randn(gen, 8, 4)
    b, c, u, v = randn(gen, 8), torch.rand(8) + 0.5, randn(gen, 4), randn(gen, 8)
    for t in (x, A, B, c):
        t.requires_grad_()
    fwd_args = (x, W, b, A, B, 0.5, None, u, None, v, 0.1, torch.tensor(9), None, None, None, c, "cpu", False)
    torch.library.opcheck(_fwd, fwd_args)
    y, q = _fwd(*fwd_args)
    needs = [True, False, True, True, True, True, True, True]
    x, A, B, c = (t.detach() for t in (x, A, B, c))
    torch.library.opcheck(_bwd, (randn(gen, *y.shape), x, W, A, B, 0.5, None, u, None, v, 0.1, torch.tensor(9),
                                 None, None, None, c, q.detach(), needs, "cpu", False))


def test_backend_under_torch_compile(ops):
    """In a fresh process, compiled first (the backend choice then loads the extension inside
    compiled code), fullgraph (aot_eager: the registered op runs the cpu backend) gives the eager
    bits, dropout on, forward and gradients."""
    code = """
import torch, lorakern
g = torch.Generator().manual_seed(0)
x, W, b = torch.randn(9, 24, generator=g), torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
A = torch.randn(4, 24, generator=g).requires_grad_()
B = torch.randn(16, 4, generator=g).requires_grad_()
def run(f):
    y = f(x)
    y.square().sum().backward()
    out = (y.detach(), A.grad.clone(), B.grad.clone())
    A.grad = B.grad = None
    return out
for backend in ("cpu", "auto"):
    f = lambda x: lorakern.lora_linear(x, W, b, A, B, scaling=0.5, dropout_p=0.2, seed=11, backend=backend)
    compiled = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    assert all(torch.equal(c, e) for c, e in zip(compiled, run(f))), backend
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bank", [False, True], ids=["one", "bank"])
def test_backend_fp32_adapters_beside_bf16_x(ops, p, bank):
    """The cpu backend's native passes with fp32 adapters beside bf16 x and W (PEFT's default
    precision), rank mask, one adapter and banks: the adapters' fp32 gradients within fp32 accuracy
    of the float64 oracle (the passes read bf16 x into f32 and compute in f32), y and dx within
    the half-precision tolerance."""
    from lorakern.backends import cpu
    from lorakern.testing import check_against_oracle, random_problem

    M, K = 70, 301  # x's rows in several row blocks of the passes at p > 0
    t, kw = random_problem(M, K, 36, 6, G=3 if bank else None, rank_scale="shared", out_scale="shared",
                           rank_mask="shared", scaling=None if bank else 0.5, dtype=torch.bfloat16)
    wide, _ = random_problem(M, K, 36, 6, G=3 if bank else None, rank_scale="shared", out_scale="shared", seed=1)
    t.update({k: wide[k] for k in ("lora_A", "lora_B", "rank_scale", "out_scale")})
    keep = cpu.dropout_keep(3, M, K, p, "cpu") if p else None
    r = check_against_oracle(t, kw, backend="cpu", dropout_p=p, seed=3, keep=keep)
    for name in ("dlora_A", "dlora_B", "drank_scale", "dout_scale"):
        assert r.outputs[name].dtype == torch.float32, name
        assert r.errors[name] < 2e-5, (name, r.errors[name])


def test_backend_unavailable_without_vector_units(ops, monkeypatch):
    """Only the scalar kernels (no AVX2 / AVX-512): the backend says why, and auto takes the torch path."""
    from lorakern.backends import cpu
    from lorakern.ops import resolve_backend

    monkeypatch.setattr(cpu_ext, "isas", lambda: ("generic",))
    ok, why = cpu.available()
    assert not ok and why.startswith("unavailable: no AVX2 or AVX-512 on this CPU")
    x = torch.randn(4, 8)
    assert resolve_backend("auto", x, 4, 8, 8, 2) == "torch"
    with pytest.raises(RuntimeError, match="no AVX2 or AVX-512"):
        resolve_backend("cpu", x, 4, 8, 8, 2)

"""The ``cuda`` backend: its build, its C++ argument checks, its Philox stream and (``gpu``) every path.

Default tier (CPU): the extension compiles and links here (skipped without nvcc), its ops reject
CPU tensors and bad shapes with an error naming the argument, and csrc/philox.h compiled for the
host reproduces the triton backend's dropout stream (checked against a pure-torch Philox and against
triton itself under TRITON_INTERPRET=1 in a subprocess). ``gpu`` tier: every path in bf16, fp16
and fp32 against the float64 oracle, outputs poisoned with NaN, awkward shapes, banks, gradients.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from lorakern import cuda
from lorakern.testing import GRAD_ARGS, check_against_oracle, random_problem

ROOT = Path(__file__).resolve().parent.parent
HAS_NVCC = cuda._nvcc() is not None and torch.version.cuda is not None
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def ops():
    """torch.ops.lorakern_cuda, built (or loaded) once; skipped where it cannot be built."""
    if not HAS_NVCC:
        pytest.skip("nvcc or a CUDA build of torch is missing: the extension cannot be built here")
    cuda.build()
    cuda._load.cache_clear()
    cuda.available.cache_clear()
    ok, why = cuda._load()
    assert ok, why
    return torch.ops.lorakern_cuda


# --------------------------------------------------------------------------- build and checks (CPU)


def test_build_links_a_library(ops):
    path = cuda.build()
    assert os.path.isfile(path) and path.endswith(".so"), path
    assert hasattr(ops, "forward") and hasattr(ops, "backward") and hasattr(ops, "dropout_keep")


def test_available_says_why_in_one_line():
    ok, why = cuda.available()
    assert ok or (why.startswith("unavailable: ") and "\n" not in why), why
    if not HAS_CUDA:
        assert not ok


def _args(dev="cpu", M=5, K=12, N=7, R=3, dt=torch.float32):
    x = torch.randn(M, K, device=dev, dtype=dt)
    W = torch.randn(N, K, device=dev, dtype=dt)
    A = torch.randn(R, K, device=dev, dtype=dt)
    B = torch.randn(N, R, device=dev, dtype=dt)
    return [x, W, None, A, B, 1.0, None, None, None, None, 0.0, 0, None, None, False]


def test_cpu_tensors_are_rejected(ops):
    with pytest.raises(RuntimeError, match=r"x: expected a CUDA tensor, got device cpu"):
        ops.forward(*_args())
    x, W, _, A, B, *_ = _args()
    with pytest.raises(RuntimeError, match=r"x: expected a CUDA tensor, got device cpu"):
        ops.backward(torch.randn(5, 7), x, W, A, B, 1.0, None, None, None, None, 0.0, 0, None, None,
                     torch.randn(5, 3), [1] * 8, False)
    with pytest.raises(RuntimeError, match=r"device: expected a CUDA device, got cpu"):
        ops.dropout_keep(1, 4, 4, 0.1, torch.device("cpu"))


# Direct calls with CUDA tensors run in a child process: a crash there (the thing these tests
# exist to rule out) fails the test with the child's fault trace instead of ending the session.
_CHECKS_CHILD = textwrap.dedent("""
    import faulthandler, sys, torch
    faulthandler.enable()
    from lorakern import cuda
    ok, why = cuda.available()
    assert ok, why
    ops, d = torch.ops.lorakern_cuda, "cuda"
    x, W, A, B = (torch.randn(*s, device=d) for s in ((5, 12), (7, 12), (3, 12), (7, 3)))
    good = [x, W, None, A, B, 1.0, None, None, None, None, 0.0, 0, None, None, False]
    A3, B3 = torch.stack([A, A]), torch.stack([B, B])
    ai = torch.tensor([0, 1, -1, 2, 0], device=d)
    cases = {
        "weight": (1, W[:, :-1]), "lora_B": (4, B[:-1]), "bias": (2, W[0, :5]), "dtype": (3, A.half()),
        "cpu": (1, W.cpu()), "dropout": (10, 1.0), "rank_idx": (8, torch.tensor([0, 5], device=d)),
        "unbanked": (12, torch.zeros(5, dtype=torch.long, device=d)), "base_scale": (13, W[:3, 0]), "range": None,
    }

    def attempt(name, args):
        print(name, end=" :: ", flush=True)
        try:
            ops.forward(*args)
            print("no error", flush=True)
        except RuntimeError as e:
            print(str(e).splitlines()[0], flush=True)

    for name, edit in cases.items():
        args = list(good)
        if edit is None:
            args[3:5], args[12] = [A3, B3], ai
        else:
            args[edit[0]] = edit[1]
        attempt(name, args)
    y, q = ops.forward(x, W, None, A3, B3, 1.0, None, None, None, None, 0.0, 0, ai, None, False, False)
    base_only = torch.allclose(y[3], x[3] @ W.T, rtol=1e-4, atol=1e-4) and bool((q[3] == 0).all())
    print("unvalidated ::", "base only" if base_only else "adapter applied", flush=True)
    # fp32 adapters beside a bf16 x and W (PEFT's default precision)
    half = [x.bfloat16(), W.bfloat16(), None, A, B, 1.0, None, None, None, None, 0.0, 0, None, None, False]
    u16, v16 = torch.ones(3, device=d, dtype=torch.bfloat16), torch.ones(7, device=d, dtype=torch.bfloat16)
    mixed = {"mixed_A": (3, A.double()), "mixed_B": (4, B.bfloat16()), "mixed_u": (7, u16.half())}
    for name, (i, value) in mixed.items():
        args = list(half)
        args[i] = value
        attempt(name, args)
    args = list(half)
    args[7], args[9] = u16, v16  # half-precision scales beside fp32 adapters: accepted
    y, q = ops.forward(*args)
    g = ops.backward(torch.ones_like(y), *args[:2], A, B, 1.0, None, u16, None, v16, 0.0, 0, None, None, q,
                     [1] * 8, False)
    print("mixed_ok ::", y.dtype, q.dtype, g[0].dtype, g[3].dtype, g[4].dtype, g[5].dtype, g[6].dtype, flush=True)
""")

_EXPECTED = {
    "weight": r"weight: expected shape \[N, 12\] \(K of x\), got \[7, 11\]",
    "lora_B": r"lora_B: expected shape \[7, 3\], got \[6, 3\]",
    "bias": r"bias: expected shape \[7\], got \[5\]",
    "dtype": r"lora_A: expected dtype Float \(that of x\), got Half",
    "cpu": r"weight: expected a CUDA tensor, got device cpu",
    "dropout": r"dropout_p: expected a float in \[0, 1\), got 1",
    "rank_idx": r"rank_idx: expected values in \[0, 3\), got 5",
    "unbanked": r"adapter_index: given, so lora_A must be a bank",
    "base_scale": r"base_scale: expected shape \[7\], got \[3\]",
    "range": r"adapter_index: expected values in \[-1, 2\), got 2",
    "unvalidated": r"base only",  # an out-of-range adapter, unchecked, reads nothing: treated as -1
    "mixed_A": r"lora_A: expected dtype BFloat16 or Float \(that of x, or float32 beside a half-precision x\), "
               r"got Double",
    "mixed_B": r"lora_B: expected dtype Float \(that of lora_A\), got BFloat16",
    "mixed_u": r"rank_scale: expected dtype BFloat16 or Float \(that of x or of lora_A\), got Half",
    # y and dx in x's dtype, q float32, dA and dB fp32, du and dv in their own dtype
    "mixed_ok": r"torch.bfloat16 torch.float32 torch.bfloat16 torch.float32 torch.float32 torch.bfloat16 "
                r"torch.bfloat16",
}


@pytest.mark.gpu
def test_bad_arguments_on_the_gpu_name_the_argument(ops):
    r = subprocess.run([sys.executable, "-c", _CHECKS_CHILD], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
    got = dict(line.split(" :: ", 1) for line in r.stdout.splitlines() if " :: " in line)
    assert r.returncode == 0, f"child crashed (rc {r.returncode}) after {list(got)}:\n{r.stderr[-3000:]}"
    for name, pattern in _EXPECTED.items():
        assert re.search(pattern, got.get(name, "")), f"{name}: {got.get(name)!r} does not match {pattern!r}"


# --------------------------------------------------------------------------- Philox stream (CPU)


def _torch_philox4(seed: int, counter: torch.Tensor) -> list[torch.Tensor]:
    """Pure-torch Philox-4x32-10 (int64 arithmetic): the four words of tl.randint4x(seed, counter)."""
    M32 = 0xFFFFFFFF
    c0, c1 = counter & M32, (counter >> 32) & M32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        a0, a2 = c0, c2
        p2 = 0xCD9E8D57 * a2  # < 2**64 but not 2**63: split to stay in int64
        hi2 = (0xCD9E8D57 * (a2 >> 16) + ((0xCD9E8D57 * (a2 & 0xFFFF)) >> 16)) >> 16
        hi0 = (0xD2511F53 * (a0 >> 16) + ((0xD2511F53 * (a0 & 0xFFFF)) >> 16)) >> 16
        c0 = (hi2 & M32) ^ c1 ^ k0
        c2 = (hi0 & M32) ^ c3 ^ k1
        c1 = p2 & M32
        c3 = (0xD2511F53 * a0) & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return [c0, c1, c2, c3]


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """tl.uint_to_uniform_float of uint32 words held in int64."""
    x = torch.where(word >= 2**31, word - 2**32, word)
    x = torch.where(x < 0, -x - 1, x).to(torch.int32)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _torch_keep_uniform(seed: int, M: int, K: int, row0: int = 0) -> torch.Tensor:
    """The dropout stream of ARCHITECTURE.md for rows row0 .. row0 + M - 1 of a [*, K] tensor:
    element (row, col) takes word col % 4 of the Philox call at counter row * ceil(K / 4) + col // 4."""
    rows = torch.arange(row0, row0 + M, dtype=torch.int64)[:, None]
    cols = torch.arange(K, dtype=torch.int64)[None, :]
    words = _torch_philox4(seed, rows * ((K + 3) // 4) + cols // 4)
    word = torch.where(cols % 4 == 0, words[0], torch.where(cols % 4 == 1, words[1],
                                                            torch.where(cols % 4 == 2, words[2], words[3])))
    return _uniform(word)


@pytest.fixture(scope="module")
def host_philox(tmp_path_factory):
    """csrc/philox.h compiled for the host as a tiny shared library (ctypes): (seed, M, K, row0) ->
    keep_uniform over rows row0 .. row0 + M - 1, float32 [M, K]."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("philox")
    src = d / "p.cpp"
    src.write_text(textwrap.dedent("""
        #include "philox.h"
        extern "C" void uniform(uint64_t seed, int64_t M, int64_t K, int64_t row0, float* out) {
          for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k) out[m * K + k] = lorakern::keep_uniform(seed, row0 + m, k, K);
        }
    """))
    lib = d / "libp.so"
    subprocess.run([cxx, "-O2", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}", str(src), "-o", str(lib)], check=True)
    so = ctypes.CDLL(str(lib))

    def run(seed: int, M: int, K: int, row0: int = 0) -> torch.Tensor:
        out = torch.empty((M, K), dtype=torch.float32)
        so.uniform(ctypes.c_uint64(seed), ctypes.c_int64(M), ctypes.c_int64(K), ctypes.c_int64(row0),
                   ctypes.c_void_p(out.data_ptr()))
        return out

    return run


# (M, K, first row): K not a multiple of 4, and rows far enough that counters pass 2**32
BLOCKS = [(7, 1, 0), (5, 13, 0), (3, 64, 0), (2, 1031, 2**33 // 258), (2, 6, 2**40)]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 2, 2**40 + 5])
@pytest.mark.parametrize("M,K,row0", BLOCKS)
def test_host_philox_matches_torch_reimplementation(host_philox, seed, M, K, row0):
    got, want = host_philox(seed, M, K, row0), _torch_keep_uniform(seed, M, K, row0)
    assert torch.equal(got, want)
    u = host_philox(seed, 40, 301)
    assert 0.45 < u.mean().item() < 0.55 and (u >= 0).all() and (u < 1).all()


def test_host_philox_matches_triton_interpreter(host_philox):
    """Triton's own Philox words and the triton backend's keep-mask, under the interpreter, against the header."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import sys, torch, triton, triton.language as tl
        from lorakern.triton.dropout import dropout_keep
        @triton.jit
        def k(out, cnt, n, seed, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            w0, w1, w2, w3 = tl.randint4x(seed, tl.load(cnt + i, mask=i < n, other=0))
            for j, w in enumerate((w0, w1, w2, w3)):
                tl.store(out + j * n + i, tl.uint_to_uniform_float(w), mask=i < n)
        cnt, seed = torch.load(sys.argv[1]), int(sys.argv[2])
        words = torch.empty((4, cnt.numel()), dtype=torch.float32)
        k[(triton.cdiv(cnt.numel(), 128),)](words, cnt, cnt.numel(), seed, BLOCK=128)
        shapes = ((9, 1), (5, 13), (4, 130))
        masks = {(M, K, p): dropout_keep(seed, M, K, p, "cpu") for M, K in shapes for p in (0.1, 0.5)}
        torch.save((words, masks), sys.argv[3])
    """)
    d = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"lk_philox_{os.getpid()}"
    d.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    cnt = torch.cat([torch.arange(300), torch.randint(0, 2**40, (200,), generator=g),
                     torch.tensor([2**32 - 1, 2**32, 2**33 + 5])])
    torch.save(cnt, d / "cnt.pt")
    for seed in (7, 2**31 - 2, 2**40 + 5):
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-c", code, str(d / "cnt.pt"), str(seed), str(d / "out.pt")],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        words, masks = torch.load(d / "out.pt")
        assert torch.equal(words, torch.stack([_uniform(w) for w in _torch_philox4(seed, cnt)]))
        for (M, K, p), keep in masks.items():
            assert torch.equal(keep, host_philox(seed, M, K) > p), (seed, M, K, p)


# --------------------------------------------------------------------------- every path (gpu)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SEED = 1234  # the dropout seed
STRIDED = dict(x="columns", weight="columns", lora_A="columns", lora_B="column_major")


def _problem(M, K, N, R, G, dt, *, bias=False, strided=False, per_adapter_scaling=False, seed=0, **scales):
    """``lorakern.testing.random_problem`` on the GPU (G = 0: one adapter; a bank's adapters all get
    rows) with scaling 0.7 unless ``per_adapter_scaling``; ``strided``: x, W and A every other column
    of a wider tensor, B column-major."""
    return random_problem(M, K, N, R, G=G or None, bias=bias, idle_adapter=False,
                          scaling=None if per_adapter_scaling else 0.7, layouts=STRIDED if strided else None,
                          seed=seed, device="cuda", dtype=dt, **scales)


CONFIGS = [
    # M, K, N, R, G, options
    (1, 64, 48, 8, 0, {}),
    (7, 131, 97, 5, 0, dict(bias=True, rank_scale="shared", out_scale="shared")),
    (16, 256, 130, 16, 0, dict(dropout=0.25, rank_mask="shared")),
    (67, 200, 77, 20, 0, dict(bias=True, rank_scale="shared", rank_mask="shared", out_scale="shared", dropout=0.1)),
    (130, 96, 257, 3, 0, dict(strided=True, bias=True, out_scale="shared", dropout=0.3)),
    (3, 72, 40, 6, 3, dict(rank_scale="per_adapter", out_scale="per_adapter", per_adapter_scaling=True)),
    (13, 136, 61, 9, 4, dict(bias=True, rank_scale="shared", out_scale="shared", rank_mask="shared", dropout=0.2)),
    (97, 80, 33, 17, 5, dict(rank_scale="per_adapter", out_scale="per_adapter", per_adapter_scaling=True,
                             rank_mask="per_adapter", dropout=0.15)),
    (300, 128, 64, 8, 2, dict(strided=True, bias=True, out_scale="per_adapter", rank_scale="per_adapter",
                              dropout=0.1)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"M{c[0]}K{c[1]}N{c[2]}R{c[3]}G{c[4]}")
def test_forward_and_every_gradient(ops, cfg, dt):
    """y and the gradients of every input, the base weight's too, against the float64 oracle."""
    M, K, N, R, G, opt = cfg
    opt = dict(opt)
    p = opt.pop("dropout", 0.0)
    t, kw = _problem(M, K, N, R, G, dt, seed=zlib.crc32(repr(cfg).encode()), **opt)
    keep = cuda.dropout_keep(SEED, M, K, p, "cuda") if p > 0 else None
    check_against_oracle(t, kw, backend="cuda", dropout_p=p, seed=SEED, keep=keep, grad_args=("weight",) + GRAD_ARGS)


@pytest.mark.gpu
def test_kernels_write_every_element(ops):
    """Outputs poisoned with NaN before the kernels run: the decode, expand and shrink paths write everything."""
    for M in (1, 9, 16, 17, 200):
        t, kw = _problem(M, 136, 75, 11, 3, torch.bfloat16, bias=True, rank_scale="per_adapter",
                         out_scale="per_adapter", per_adapter_scaling=True)
        poison = torch.full((8 * M * 75 + 4096,), float("nan"), device="cuda", dtype=torch.bfloat16)
        del poison  # the caching allocator hands these NaN-filled blocks to the outputs
        y, q = ops.forward(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0, kw["scaling"],
                           t["rank_scale"], None, t["out_scale"], 0.1, 5, kw["adapter_index"], None, False)
        assert not torch.isnan(y).any() and not torch.isnan(q).any(), M


@pytest.mark.gpu
def test_keep_mask_matches_host_philox_and_rate(ops, host_philox):
    M, K, p, seed = 37, 1031, 0.3, 99
    keep = cuda.dropout_keep(seed, M, K, p, "cuda").cpu()
    want = host_philox(seed, M, K) > p
    assert torch.equal(keep, want)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01


@pytest.mark.gpu
def test_frozen_inputs_get_nothing(ops):
    t, _ = _problem(40, 64, 32, 4, 0, torch.float16, bias=True, rank_scale="shared", out_scale="shared")
    grads = ops.backward(torch.randn(40, 32, device="cuda", dtype=torch.float16), t["x"], t["weight"], t["lora_A"],
                         t["lora_B"], 0.7, None, t["rank_scale"], None, t["out_scale"], 0.0, 0, None, None,
                         torch.randn(40, 4, device="cuda"), [0, 0, 0, 1, 0, 0, 0, 0], False)
    assert [g.numel() == 0 for g in grads] == [True, True, True, False, True, True, True, True]

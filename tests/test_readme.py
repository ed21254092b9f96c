"""The README runs as written: every ```python block executes, the commands it names exist.

Each ```python block runs in a fresh namespace, unless the line before it is the HTML comment
``<!-- continues the previous block -->`` (then it runs in the previous block's namespace). A block
that cannot run here is tagged otherwise (```python-gpu) or preceded by ``<!-- not run: <why> -->``;
the count of such blocks is kept small on purpose. Blocks that import peft or transformers are
skipped where those are not installed (``pip install "lorakern[peft]"``).
"""
from __future__ import annotations

import contextlib
import io
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w+-]*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not run:.*-->")
CONTINUES = re.compile(r"<!--\s*continues the previous block\s*-->")
MAX_NOT_RUN = 3


def _blocks(text: str) -> list[dict]:
    """Every fenced block: its tag, first line (1-based), code and the comment line before it."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        out.append({"tag": m.group(1), "line": i + 1, "code": "\n".join(lines[i + 1:j]), "before": before})
        i = j + 1
    return out


BLOCKS = _blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b["tag"] == "python"]


def test_readme_has_runnable_blocks_and_few_exceptions():
    assert len(PYTHON) >= 6, "the README should show runnable python examples"
    skipped = [b for b in BLOCKS if b["tag"].startswith("python-") or
               (b["tag"] == "python" and NOT_RUN.search(b["before"]))]
    assert len(skipped) <= MAX_NOT_RUN, f"too many README blocks marked not run: {[b['line'] for b in skipped]}"


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_namespaces: dict[int, dict] = {}


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=[f"line{b['line']}" for b in PYTHON])
def test_readme_python_block_runs(index, one_thread, monkeypatch, tmp_path):
    block = PYTHON[index]
    if NOT_RUN.search(block["before"]):
        pytest.skip(f"README line {block['line']}: {block['before'].strip()}")
    for mod in ("peft", "transformers"):
        if re.search(rf"^\s*(import|from)\s+(lorakern\.)?{mod}\b", block["code"], re.M):
            pytest.importorskip(mod, reason=f'README line {block["line"]} needs pip install ".[peft]"')
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__readme__"}
    if CONTINUES.search(block["before"]):
        assert index > 0 and index - 1 in _namespaces, f"README line {block['line']}: no previous block ran"
        ns = _namespaces[index - 1]
    import lorakern.peft
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block["code"], f"README.md:{block['line']}", "exec"), ns)
    finally:
        lorakern.peft.disable()  # a block that enables must not change the other tests
    _namespaces[index] = ns


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, re.M))


def test_readme_make_targets_exist():
    named = set(re.findall(r"`make ([\w-]+)`", README.read_text()))
    assert {"demo", "test"} <= named
    missing = named - _make_targets()
    assert not missing, f"README names make targets the Makefile lacks: {sorted(missing)}"


def test_readme_cli_commands_exist():
    named = set(re.findall(r"`lorakern (\w+)[ `]", README.read_text())) - {"COMMAND"}
    out = subprocess.run([sys.executable, "-m", "lorakern.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    missing = {c for c in named if not re.search(rf"^\s+{c}\s", out.stdout, re.M)}
    assert not missing, f"README names lorakern commands that --help does not list: {sorted(missing)}"


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#:]+)\)", README.read_text()):
        assert (ROOT / target).exists(), f"README links to {target}, which the repository lacks"
    assert "DESIGN.md" not in README.read_text(), "DESIGN.md is not in the repository"


def test_readme_extras_exist():
    tomllib = pytest.importorskip("tomllib")  # python >= 3.11; the project allows 3.10
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set(re.findall(r'(?:lorakern|\.)\[(\w+)\]', README.read_text()))
    assert named and named <= extras, f"README names extras pyproject.toml lacks: {sorted(named - extras)}"


DOCS = [README, ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").glob("*.md"))]
REPO_PATH = re.compile(r"((?:\.\./)*(?:bench|docs|lorakern|tests|csrc)/[\w./-]*\w)(\*?)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_stand_alone_without_the_tracker_or_files_outside_the_clone(doc):
    text = doc.read_text()
    numbered = re.findall(r"\bissues? \d+|\bissue-\d+|\.\./shared/", text, re.I)
    assert not numbered, f"{doc.name} points to the tracker or outside the repository: {numbered}"
    for ref, glob in REPO_PATH.findall(text):
        if not glob:  # a glob names build outputs (lorakern/_lorakern_cuda*.so)
            assert (ROOT / ref).exists() or (doc.parent / ref).exists(), f"{doc.name} names {ref}, which a clone lacks"

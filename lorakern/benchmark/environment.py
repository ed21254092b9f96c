"""Where a run happened: the device, its short name for result files, the commit and the versions.

>>> device_slug(torch.device("cpu"))
'cpu'
>>> sorted(describe(torch.device("cpu")))
['commit', 'date', 'device', 'slug', 'torch', 'triton']
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

__all__ = ["device_slug", "device_name", "commit", "triton_version", "describe"]

_ROOT = Path(__file__).resolve().parents[2]


def device_slug(device: torch.device) -> str:
    """Short name of the device kind for result files: 'h100', 'h200', 'a100', ... or 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    for token in name.replace("NVIDIA", "").split():
        if any(ch.isdigit() for ch in token):
            return token.split("-")[0].lower()
    return name.split()[-1].lower()


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"``, or ``"CPU x86_64 (2 threads)"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def commit() -> str:
    """``$LORAKERN_COMMIT``, else git's HEAD (``+dirty`` when lorakern/ or csrc/ differ from it),
    else HEAD read from .git's files (a copied tree without git), else ``"unknown"``."""
    env = os.environ.get("LORAKERN_COMMIT")
    if env:
        return env
    git = ["git", "-c", f"safe.directory={_ROOT}"]
    try:
        head = subprocess.run(git + ["rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", "lorakern", "csrc"], cwd=_ROOT).returncode
    except (OSError, subprocess.CalledProcessError):
        return _commit_from_files(_ROOT / ".git")
    return head + ("+dirty" if dirty else "")


def _commit_from_files(git_dir: Path) -> str:
    """HEAD's commit read from .git without git; whether it is dirty is unknown."""
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (git_dir / ref).exists():
            return (git_dir / ref).read_text().strip()
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def triton_version() -> Optional[str]:
    """triton's version, or None where it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def describe(device: torch.device) -> dict:
    """The header of a result file: device, slug, commit, torch, triton, date (UTC, ISO 8601)."""
    return {"device": device_name(device), "slug": device_slug(device), "commit": commit(),
            "torch": torch.__version__, "triton": triton_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

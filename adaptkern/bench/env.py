"""Where a benchmark runs: the device, what the fused ops execute there, and the environment
record stored with every results file (GPU name, versions, timestamp, commit).

Light on purpose: ``adaptkern info`` imports this module and nothing else of the harness.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from adaptkern.ops.config import interpreting

_REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "triton", "transformers", "peft", "safetensors")


def default_device() -> torch.device:
    """The current CUDA device, or the CPU when none is visible."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, "cpu" otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def execution_path(device: torch.device) -> str:
    """What the fused ops run on ``device``: the Triton kernels, the interpreter, or the reference."""
    if device.type == "cuda":
        return "Triton kernels (CUDA)" + (" under the Triton interpreter" if interpreting() else "")
    if interpreting():
        return "Triton kernels in the interpreter on the CPU (TRITON_INTERPRET=1)"
    return "the PyTorch reference (adaptkern.ops.adapter_linear.reference) on the CPU"


def package_version(name: str) -> Optional[str]:
    """The installed version of ``name`` (from its metadata, without importing it), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> Optional[str]:
    """The NVIDIA driver version from ``nvidia-smi``, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0].strip() if lines else None


def commit() -> Optional[str]:
    """``ADAPTKERN_COMMIT`` when set (copies of the tree without ``.git``), else git's HEAD of
    this checkout with "+dirty" when tracked files differ, else None (an installed package)."""
    if os.environ.get("ADAPTKERN_COMMIT"):
        return os.environ["ADAPTKERN_COMMIT"]
    if not (_REPO / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """The record stored with a results file: device, versions, timestamp (UTC), commit."""
    import adaptkern

    gpu = device.type == "cuda"
    return {
        "gpu": device_name(device),
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "driver": driver_version() if gpu else None,
        "cuda": torch.version.cuda,
        "adaptkern": adaptkern.__version__,
        "python": platform.python_version(),
        **{name: package_version(name) for name in PACKAGES},
        "torch": torch.__version__,  # the runtime's (a local build may differ from its metadata)
        "fused_ops_run": execution_path(device),
        "commit": commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }

"""Superseded by ``benchmarks/kernel_report.py``, the compiled-code report (run in CI by
tests/test_compile_for_gpu.py).

The old script compiled each kernel without the JIT's argument specialisation (16-byte
alignment, divisibility by 16, stride-1 constants), so it checked kernels the GPU never runs
(4-byte copies where the real launches use 16-byte cp.async). The report captures the
launches the public ops make and compiles each exactly as the JIT would.

``python tests/compile_for_gpu.py`` still works: it runs the report with ``--check``.
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--check", *[a for a in sys.argv[1:] if a not in ("--arch", "90")]]
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_report.py"), run_name="__main__")

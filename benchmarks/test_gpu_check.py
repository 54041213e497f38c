"""benchmarks/gpu_check.sh, the one prepared GPU call, as far as a CPU can run it.

The dry run runs the CPU steps (env, the bench smoke test, the results plumbing, the CPU
compiled-code report, the GPU test selection) and skips the GPU-only ones; these tests check
the script's plumbing: every step lands in summary.tsv with a status, GPU-only steps say why
they were skipped, the exit status follows the statuses, and the logs are packed. Whether a
step's own command passes is that command's business (its own tests), not asserted here.
The comparison of the GPU compile with the CPU report and the targets table are checked on
made-up rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import gpu_check

SCRIPT = Path(__file__).resolve().parent / "gpu_check.sh"
STEPS = ("env", "bench", "bench-graph", "results", "kernel-report-cpu", "gpu-tests", "kernel-report-gpu")
GPU_ONLY = ("bench-graph", "kernel-report-gpu")
STATUSES = {"ok", "FAIL", "TIMEOUT", "skipped"}

needs_shell = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout") and shutil.which("tar")),
                                 reason="needs bash, coreutils timeout and tar")


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), PYTHON=sys.executable, **extra)
    return env


def _summary(out: Path) -> dict:
    lines = (out / "summary.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "status", "rc", "wall_s", "budget_s", "est_gpu_s", "note"]
    rows = {}
    for line in lines[1:]:
        cells = line.split("\t")
        assert len(cells) == 7, line
        assert cells[0] not in rows, f"step {cells[0]} recorded twice"
        rows[cells[0]] = dict(zip(("status", "rc", "wall_s", "budget_s", "est_gpu_s", "note"), cells[1:]))
    return rows


@pytest.mark.slow
@needs_shell
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path; a GPU machine runs the real one")
def test_dry_run_records_every_step(tmp_path):
    # One report scenario keeps this near a minute on two cores (all 11, the default, take ~2.5 min here).
    env = _env(tmp_path, GPU_CHECK_SCENARIOS="lora r16 M16 decode", GPU_CHECK_BUDGET_S="240")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=SCRIPT.parents[1], env=env, capture_output=True,
                          text=True, timeout=300)
    out = tmp_path / "out"
    rows = _summary(out)
    steps = [s for s in rows if not s.startswith("#")]
    assert sorted(steps) == sorted(STEPS), proc.stdout[-3000:]
    for name in STEPS:
        assert rows[name]["status"] in STATUSES, (name, rows[name])
        assert rows[name]["wall_s"].isdigit() and rows[name]["budget_s"].isdigit()
    for name in GPU_ONLY:
        assert rows[name]["status"] == "skipped" and "dry run" in rows[name]["note"]
        assert f"== {name}: SKIPPED - GPU-only step, skipped in the dry run" in proc.stdout
    assert "collect-only" in rows["gpu-tests"]["note"]
    failed = [s for s in STEPS if rows[s]["status"] in ("FAIL", "TIMEOUT")]
    assert rows["# total"]["status"] == ("FAIL" if failed else "ok")
    assert proc.returncode == (1 if failed else 0), (failed, proc.stdout[-3000:], proc.stderr[-2000:])
    # the console ends with the summary; the log holds every step's output
    assert "== summary" in proc.stdout
    log = (out / "gpu_check.log").read_text()
    assert all(f"== {s}:" in log for s in STEPS)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    ran = [s for s in STEPS if rows[s]["status"] != "skipped"]
    assert all(f"./logs/{s}.log" in names for s in ran), names
    # a CPU run never writes where GPU results are committed from
    assert not (out / "benchmarks" / "results").exists()
    if rows["results"]["status"] == "ok":
        assert list((out / "benchmarks" / "results-cpu-smoke").glob("*.json"))
        assert "| LoRA r=16 M=8192 fwd+bwd |" in (out / "targets.md").read_text()
    # the device tool brings back at most 8 files, at most two folders down
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files


@needs_shell
def test_unknown_step_is_a_usage_error(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "bench,nope"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step 'nope'" in proc.stderr


@needs_shell
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_run_without_a_gpu_refuses(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--only", "env"], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stdout
    assert _summary(tmp_path / "out")["setup"]["status"] == "FAIL"


# -- the cross-check and the targets table on made-up rows ------------------------------------------


def _cpu_row(scenario, kernel, grid, regs, ctas=2, role="r"):
    return {"scenario": scenario, "role": role, "kernel": kernel, "grid": grid, "tiles": "128×128×64", "warps": 8,
            "stages": 3, "flags": "HAS_SECOND=1", "facts": {"regs": regs, "stack": 0, "smem": 98304,
                                                            "ctas_sm": ctas, "mma": "wgmma"}}


def _gpu_row(scenario, kernel, grid, regs, ctas=2):
    return {"scenario": scenario, "kernel": kernel, "grid": grid, "tiles": "128×128×64", "warps": 8, "stages": 3,
            "flags": "HAS_SECOND=1", "facts": {"regs": regs, "local": 0, "smem": 98304, "ctas_sm": ctas,
                                               "mma": "wgmma"}}


def test_compare_flags_every_difference():
    cpu = [_cpu_row("a", "_k", "2048×1", 119, role="main"), _cpu_row("a", "_k", "64×1", 56, role="shrink"),
           _cpu_row("a", "_only_cpu", "8×1", 40), _cpu_row("c", "_k", "1×1", 1)]
    gpu = [_gpu_row("a", "_k", "2048×1", 119), _gpu_row("a", "_k", "64×1", 60, ctas=1),
           _gpu_row("a", "_only_gpu", "8×1", 40), _gpu_row("b", "_k", "1×1", 1)]
    lines, problems, matched = gpu_check.compare(gpu, cpu)
    status = [ln["status"] for ln in lines]
    assert matched == 2
    assert status[0] == "ok"
    assert status[1].startswith("MISMATCH") and "regs GPU 60 vs CPU 56" in status[1] and "ctas_sm GPU 1" in status[1]
    assert status[2].startswith("MISMATCH: launched on the GPU")
    assert "not compared" in status[3]  # scenario b is not in the CPU report
    assert any("_only_cpu" in p for p in problems)  # in the report, never launched
    assert not any(p.startswith("c /") for p in problems)  # c never ran on the GPU
    assert len(problems) == 3


def test_tiles_and_flags_read_like_the_report():
    kw = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_K2=16, HAS_SECOND=True, SPLIT_K=1, DROP=0, num_warps=8)
    assert gpu_check.tiles_of(kw) == "128×128×64 k216"
    assert gpu_check.flags_of(kw) == "HAS_SECOND=1 SPLIT_K=1"
    assert gpu_check.mma_of("HGMMA.64x128x16.F32.BF16 R0\n HMMA.16816.F32 R2") == "mma.sync+wgmma"
    assert gpu_check.mma_of("FFMA R1") == "fma"


def _results(device, rows):
    return {"env": {"gpu": "NVIDIA H200", "device": device}, "ceilings": {"bf16_tflops": 780.0, "copy_gbps": 4300.0},
            "rows": rows, "failures": []}


def _row(impl, ms, **case):
    base = dict(suite="core", kind="lora", M=8192, K=4096, N=4096, rank=16, num_adapters=1, activation="identity",
                dtype="bfloat16", mode="forward_backward")
    return {**base, **case, "impl": impl, "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mem_mb": None}


def test_targets_table_ratios_and_missing():
    rows = [_row("fused", 2.0), _row("eager", 3.0), _row("peft", 3.2), _row("base_linear", 1.6)]
    rows += [_row(i, ms, suite="mixed", M=256, num_adapters=s, mode="forward")
             for i, ms, s in (("fused", 0.05, 1), ("fused", 0.08, 128))]
    text, missing = gpu_check.targets_table({"eager": _results("cuda", rows), "graph": None})
    assert "| LoRA r=16 M=8192 fwd+bwd | do_bench, L2 cleared | 2.0000 | eager/fused 1.50x, peft/fused 1.60x, " \
           "fused/F.linear 1.25x |" in text
    assert "S=128 / S=1 1.60x" in text
    assert "bf16 matmul 780 TFLOP/s, copy 4300 GB/s" in text
    assert "LoRA r=16 M=8192 forward" in missing and "LoRA r=16 M=8192 fwd+bwd" not in missing


def test_results_copies_gpu_files_where_they_are_committed(tmp_path):
    bench, graph, out = tmp_path / "bench", tmp_path / "graph", tmp_path / "out"
    bench.mkdir()
    graph.mkdir()
    import json

    (bench / "h200.json").write_text(json.dumps(_results("cuda", [_row("fused", 2.0)])))
    (graph / "h200-cudagraph.json").write_text(json.dumps(_results("cuda", [_row("fused", 2.0)])))
    status = gpu_check.main(["results", "--bench", str(bench), "--graph", str(graph), "--out", str(out)])
    assert (out / "benchmarks" / "results" / "h200.json").is_file()
    assert (out / "benchmarks" / "results" / "h200-cudagraph.json").is_file()
    assert (out / "targets.md").is_file()
    assert status == 1  # most targets have no row in this made-up file


def test_bench_step_times_every_suite_headline_row():
    """The bench step's --impls are impls the harness knows, and every target selects a case of
    ``--suite all --quick`` (so a GPU run has a row for each)."""
    import re

    from adaptkern.bench import cases, impls

    text = SCRIPT.read_text()
    names = re.search(r"bench --suite all --quick \\\n\s+--impls (\S+)", text).group(1).split(",")
    assert set(names) <= set(impls.IMPLS) and "graph_replay" in names and "dequant" in names
    quick = cases.select("all", quick=True)
    for title, sel, shown in gpu_check.TARGETS:
        want = {"dtype": "bfloat16", "K": 4096, "N": 4096, **{k: v for k, v in sel.items() if k != "mode"}}
        hits = [c for c in quick if all(c.fields().get(k) == v for k, v in want.items()) and sel["mode"] in c.modes]
        assert hits, title
        for key in shown:
            assert all(p in (*names, "F.linear") for p in key.split("/")), (title, key)
    assert {s for c in quick for s in [c.suite]} == set(cases.SUITES)


def test_targets_table_reads_the_new_suites_rows():
    rows = [_row("fused", 4.0, suite="qlora", kind="qlora", variant="train"), _row("peft", 6.0, suite="qlora",
                                                                                 kind="qlora", variant="train"),
            _row("fused", 0.05, suite="serving", kind="qkv", M=64, N=6144, num_adapters=32, mode="forward"),
            _row("vllm", 0.5, suite="serving", kind="qkv", M=64, N=6144, num_adapters=32, mode="forward")]
    text, missing = gpu_check.targets_table({"eager": _results("cuda", rows), "graph": None})
    assert "| QLoRA NF4 r=16 M=8192 fwd+bwd | do_bench, L2 cleared | 4.0000 | peft/fused 1.50x |" in text
    assert "vllm/fused 10.00x" in text
    assert "DoRA r=16 M=8192 fwd+bwd (goal: fused/LoRA <= 1.1)" in missing

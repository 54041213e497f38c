"""The ``adaptkern`` command: ``bench --quick`` writes a valid results file, a wrong kernel
is never timed, ``check`` passes, ``info`` prints versions; plus the results-file helpers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptkern import cli
from adaptkern.bench import baselines, cases, report, run_bench, timing

REPO = Path(__file__).resolve().parents[1]
ENV_KEYS = {"gpu", "driver", "torch", "triton", "commit", "date"}
IMPLS = {"fused", "eager", "peft", "compiled_eager", "base_linear"}


def _assert_results_schema(data):
    assert {"env", "ceilings", "rows"} <= set(data)
    assert ENV_KEYS <= set(data["env"]), data["env"]
    assert set(data["ceilings"]) == {"bf16_tflops", "copy_gbps"}
    assert all(v > 0 for v in data["ceilings"].values())
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert list(row) == list(report.ROW_KEYS), row
        assert row["suite"] in ("core", "mixed")
        assert row["impl"] in IMPLS
        assert row["mode"] in ("forward", "forward_backward")
        assert row["kind"] in cases.KINDS
        assert all(isinstance(row[k], int) and row[k] > 0 for k in ("M", "K", "N", "rank", "num_adapters"))
        assert row["dtype"] in cases.DTYPES
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["peak_mem_mb"] is None or row["peak_mem_mb"] >= 0


def test_bench_quick_writes_results(tmp_path):
    """The real entry point in a fresh process: check, time, table, results file, exit 0."""
    cmd = [sys.executable, "-m", "adaptkern.cli", "bench", "--quick", "--out", str(tmp_path)]
    if torch.cuda.is_available():  # keep it short on a GPU: one target case, no torch.compile
        cmd += ["--filter", "lora", "--impls", "fused,eager,base_linear"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    slug = report.gpu_slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"
    data = json.loads((tmp_path / f"{slug}.json").read_text())
    _assert_results_schema(data)
    assert data["failures"] == []
    assert {r["impl"] for r in data["rows"]} >= {"fused", "eager", "base_linear"}
    assert {r["mode"] for r in data["rows"]} == {"forward", "forward_backward"}
    assert "eager/fused" in proc.stdout and "fused/F.linear" in proc.stdout
    assert "check: ok" in proc.stderr
    if not torch.cuda.is_available():
        assert "not GPU figures" in data["env"]["note"]
        assert "not GPU figures" in proc.stdout and "not GPU figures" in proc.stderr
        assert data["env"]["gpu"] == "cpu"


def test_wrong_kernel_is_never_timed(tmp_path, monkeypatch):
    real = baselines._fused_core

    def wrong(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    monkeypatch.setattr(baselines, "_fused_core", wrong)
    logs, shown = [], []
    rc = run_bench("core", quick=True, out=str(tmp_path), impls=("fused", "base_linear"), filter="lora",
                   plot=False, log=logs.append, show=shown.append)
    assert rc == 1
    data = report.load(next(tmp_path.glob("*.json")))
    assert not any(r["impl"] == "fused" for r in data["rows"])
    assert any(r["impl"] == "base_linear" for r in data["rows"])
    assert len(data["failures"]) == 1 and data["failures"][0]["case"].startswith("lora-")
    assert "FAILED" in "\n".join(shown)
    assert any("FAILED (wrong against float64" in line for line in logs)


def test_check_passes(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "FAIL " not in out
    for kind in ("lora", "bottleneck_sequential", "bottleneck_parallel"):
        assert f"PASS  {kind}-" in out
    for dtype in ("fp32", "fp16", "bf16"):
        assert f"-{dtype} " in out
    assert " passed" in out


def test_info_prints_versions(capsys):
    import triton

    import adaptkern

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"adaptkern     {adaptkern.__version__}" in out
    assert torch.__version__ in out and triton.__version__ in out
    for name in ("transformers", "peft", "interpreter", "fused ops run", "device"):
        assert name in out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--suite", "nope"])
    with pytest.raises(ValueError, match="unknown impl"):
        run_bench("core", quick=True, impls=("fast",), log=lambda s: None, show=lambda s: None)


def test_cases_match_the_issues():
    core = cases.core_cases()
    assert len(core) == 2 * 2 * 5
    assert {c.M for c in core} == {2048, 8192} and {(c.K, c.N) for c in core} == {(4096, 4096), (4096, 14336)}
    assert {c.rank for c in core if c.kind == "lora"} == {8, 16, 64}
    assert {(c.rank, c.activation) for c in core if c.kind != "lora"} == {(256, "gelu")}
    mixed = cases.mixed_cases()
    assert {c.M for c in mixed} == {1, 16, 64, 256, 2048, 8192}
    assert all(c.num_adapters <= c.M and c.K == c.N == 4096 for c in mixed)
    assert len({c.id for c in core + mixed}) == len(core + mixed)
    ids = cases.uniform_adapter_ids(70, 8)
    assert ids.dtype == torch.int32 and sorted(torch.bincount(ids).tolist()) == [8] * 2 + [9] * 6
    assert cases.select("all", filter="lora,M8192,r16") == [c for c in core + mixed
                                                            if c.kind == "lora" and c.M == 8192 and c.rank == 16]


def test_work_model():
    c = cases.Case("core", "lora", 8, 16, 32, 4)
    flops, nbytes = cases.work(c, "forward")
    assert flops == 2 * 8 * 16 * 32 + 2 * 8 * 4 * (16 + 32)
    assert nbytes == 2 * (8 * 16 + 32 * 16 + 4 * (16 + 32) + 8 * 32)
    # 1 TFLOP at 1000 TFLOP/s is 1 ms; a 2 ms run is at half the roofline
    assert timing.roofline_fraction(1e12, 1.0, 2.0, {"bf16_tflops": 1000.0, "copy_gbps": 1000.0}) == pytest.approx(0.5)


def test_gpu_slug():
    assert report.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert report.gpu_slug("NVIDIA H200") == "h200"
    assert report.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert report.gpu_slug("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert report.gpu_slug("cpu") == "cpu"


def _row(impl, m, ms, suite="core", kind="lora", mode="forward"):
    return {"suite": suite, "impl": impl, "mode": mode, "kind": kind, "M": m, "K": 16, "N": 16, "rank": 4,
            "num_adapters": 1, "activation": "identity", "dtype": "bfloat16", "median_ms": ms, "p20_ms": ms,
            "p80_ms": ms, "peak_mem_mb": None}


def test_results_merge_same_commit_only(tmp_path):
    env = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "1", "torch": "t", "triton": "t", "commit": "abc", "date": "d"}
    ceil = {"bf16_tflops": 1.0, "copy_gbps": 1.0}
    log = []
    report.write_results(tmp_path, env, ceil, [_row("fused", 8, 1.0), _row("eager", 8, 2.0)], [], log.append)
    report.write_results(tmp_path, env, ceil, [_row("fused", 8, 3.0), _row("fused", 16, 1.0, suite="mixed")], [],
                         log.append)
    data = report.load(tmp_path / "h100.json")
    got = {(r["suite"], r["impl"], r["M"]): r["median_ms"] for r in data["rows"]}
    assert got == {("core", "fused", 8): 3.0, ("core", "eager", 8): 2.0, ("mixed", "fused", 16): 1.0}
    assert isinstance(data["targets"], list) and all({"target", "measured", "met"} == set(t) for t in data["targets"])
    report.write_results(tmp_path, dict(env, commit="def"), ceil, [_row("eager", 8, 5.0)], [], log.append)
    data = report.load(tmp_path / "h100.json")
    assert [(r["impl"], r["median_ms"]) for r in data["rows"]] == [("eager", 5.0)]
    assert "replaced" in log[-1]


def test_targets_are_evaluated():
    rows = []
    for impl, ms in (("fused", 1.0), ("eager", 1.5), ("peft", 1.2)):
        rows.append(dict(_row(impl, 8192, ms, mode="forward_backward"), K=4096, N=4096, rank=16))
    t = {x["target"]: x for x in report.evaluate_targets({"rows": rows, "ceilings": {}})}
    eager = next(v for k, v in t.items() if k.startswith("LoRA") and "eager" in k)
    peft = next(v for k, v in t.items() if k.startswith("LoRA") and "peft" in k)
    assert eager["met"] is True and eager["measured"].startswith("1.50x")
    assert peft["met"] is False and peft["measured"].startswith("1.20x")
    assert any(v["met"] is None for v in t.values())


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    log = []
    data = {"env": {"gpu": "cpu", "torch": "t", "triton": "t", "commit": "c", "date": "d"}, "rows": []}
    assert report.plot(data, tmp_path / "x.png", log.append) is None
    assert "matplotlib" in log[0] and not (tmp_path / "x.png").exists()

"""The ``adaptkern`` command and the benchmark harness behind it: ``bench --quick`` writes a valid
results file and says what it is, a wrong kernel is never timed and fails the run, ``check``
passes, ``info`` stays light, every subcommand has help; the tolerance helper of
``adaptkern.testing``; the table and plot of GPU and CPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaptkern
from adaptkern import cli
from adaptkern.bench import cases, env, impls, plot, report, timing
from adaptkern.ops import config
from adaptkern.bench.run import UsageError, run_bench
from adaptkern.testing import assert_close, compare

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def _assert_results_schema(data):
    assert {"env", "ceilings", "rows", "failures"} == set(data)
    keys = {"gpu", "device", "torch", "triton", "adaptkern", "peft", "commit", "timestamp", "method"}
    assert keys <= set(data["env"])
    assert data["env"]["adaptkern"] == adaptkern.__version__
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert tuple(row) == report.ROW_KEYS, row
        assert row["impl"] in impls.IMPLS and row["mode"] in cases.MODES and row["kind"] in cases.KINDS
        assert all(isinstance(row[k], int) and row[k] > 0 for k in ("M", "K", "N", "rank", "num_adapters"))
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row


# -- the main job --------------------------------------------------------------------------------


def test_bench_quick_writes_results_and_says_what_it_is(tmp_path):
    """The real entry point in a fresh process (``python -m adaptkern``): check, time, table, file, exit 0."""
    cmd = ["-m", "adaptkern", "bench", "--quick", "--out", str(tmp_path)]
    if CUDA:  # keep it short on a GPU: one case, no torch.compile
        cmd += ["--filter", "lora", "--impls", "fused,eager,base_linear"]
    proc = _run(*cmd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / f"{config.gpu_slug(env.device_name(env.default_device()))}.json").read_text())
    _assert_results_schema(data)
    assert data["failures"] == []
    assert {r["impl"] for r in data["rows"]} >= {"fused", "eager", "base_linear"}
    assert {r["mode"] for r in data["rows"]} == {"forward", "forward_backward"}
    assert "check: ok" in proc.stderr and "case id: <kind>-M<rows>" in proc.stdout
    assert "benchmarks/README.md" in proc.stdout
    if not CUDA:
        assert data["env"]["gpu"] == "cpu" and data["ceilings"] is None
        assert "torch.utils.benchmark" in data["env"]["method"]
        assert proc.stdout.count(report.CPU_CAVEAT) >= 2  # in the header and under the table
        assert "/fused" not in proc.stdout and "roofline" not in proc.stdout.splitlines()[-8]
        assert all(r["peak_mem_mb"] is None for r in data["rows"])
    else:
        assert "eager/fused" in proc.stdout and "fused/F.linear" in proc.stdout


def test_wrong_kernel_is_never_timed_and_fails_the_run(tmp_path, monkeypatch):
    real = impls.fused_core
    monkeypatch.setattr(impls, "fused_core", lambda *a, **k: real(*a, **k) * 1.01)
    logs, shown = [], []
    rc = run_bench("core", quick=True, out=str(tmp_path), impl_names=("fused", "base_linear"), filter="lora",
                   plot=False, log=logs.append, show=shown.append)
    assert rc == 1
    data = report.load(next(tmp_path.glob("*.json")))
    assert not any(r["impl"] == "fused" for r in data["rows"])
    assert any(r["impl"] == "base_linear" for r in data["rows"])
    assert len(data["failures"]) == 1 and data["failures"][0]["case"].startswith("lora-")
    assert "max error" in data["failures"][0]["error"] and "at index [" in data["failures"][0]["error"]
    assert "FAILED" in "\n".join(shown)
    assert any("FAILED their check" in line for line in logs)


def test_crashing_fused_op_fails_the_run(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(impls, "fused_core", boom)
    rc = run_bench("core", quick=True, out=str(tmp_path), impl_names=("fused",), filter="lora", plot=False,
                   log=lambda s: None, show=lambda s: None)
    assert rc == 1
    assert "kernel exploded" in report.load(next(tmp_path.glob("*.json")))["failures"][0]["error"]


def test_check_passes(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "FAIL " not in out
    for kind in ("lora", "bottleneck_sequential", "bottleneck_parallel"):
        assert f"PASS  {kind}-" in out
    assert "-S3-" in out  # mixed batches
    for dtype in ("fp32", "fp16", "bf16"):
        assert f"-{dtype} " in out
    assert " passed" in out


# -- the command line ----------------------------------------------------------------------------


def test_version_and_python_m():
    proc = _run("-m", "adaptkern", "--version", timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"adaptkern {adaptkern.__version__}"


def test_every_subcommand_has_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    top = capsys.readouterr().out
    assert info.value.code == 0 and "benchmarks/tune.py" in top
    for cmd, words in (("bench", "float64"), ("check", "float64"), ("info", "versions")):
        assert cmd in top
        with pytest.raises(SystemExit) as info:
            cli.main([cmd, "--help"])
        text = capsys.readouterr().out
        assert info.value.code == 0 and words in text, text


def test_filter_that_matches_nothing_is_an_error(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--filter", "nothing-like-this", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "matches none of the" in err and "ids look like" in err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing was written


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--suite", "nope"])
    assert info.value.code == 2
    assert cli.main(["bench", "--impls", "fast"]) == 2
    assert "unknown impl 'fast'" in capsys.readouterr().err
    assert cli.main(["bench", "--modes", "backward"]) == 2
    with pytest.raises(UsageError):
        run_bench("core", modes=("sideways",), log=lambda s: None, show=lambda s: None)
    with pytest.raises(SystemExit) as info:
        cli.main(["tune"])  # the tuner is a script: benchmarks/tune.py
    assert info.value.code == 2


def test_info_prints_versions_and_stays_light():
    code = ("import sys; from adaptkern import cli; cli.main(['info']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'matplotlib') "
            "or m in ('adaptkern.bench.run', 'adaptkern.bench.impls', 'adaptkern.bench.report', 'torch._dynamo')))")
    proc = _run("-c", code, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[-1] == "[]", out[-1]
    text = "\n".join(out)
    assert f"adaptkern     {adaptkern.__version__}" in text and torch.__version__ in text
    for name in ("triton", "transformers", "peft", "interpreter", "fused ops run", "device"):
        assert name in text


# -- the tolerance helper ------------------------------------------------------------------------


def test_assert_close_names_the_tensor_the_error_and_where():
    ref = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(3, 4)
    eager = ref.to(torch.bfloat16)
    out = eager.clone()
    out[2, 1] += 0.5
    result = compare("dx", ref, out, eager)
    assert not result.ok and result.index == (2, 1) and result.error > result.bound
    with pytest.raises(AssertionError) as info:
        assert_close("dx", ref, out, eager)
    text = str(info.value)
    assert text.startswith("dx: max error") and "at index [2, 1]" in text and "allowed" in text
    assert assert_close("y", ref, eager, eager).ok  # eager itself is within 2x its own error
    # the bound: 2 x eager's error + atol x max(1, max|ref|)
    assert compare("y", ref, eager, eager).bound == pytest.approx(2 * compare("y", ref, eager).error + 4e-3 * 2.0)


def test_compare_catches_nan_shape_and_empty():
    ref = torch.zeros(2, 3, dtype=torch.float64)
    nan = torch.zeros(2, 3)
    nan[1, 2] = float("nan")
    bad = compare("y", ref, nan, torch.zeros(2, 3))
    assert not bad.ok and bad.error == float("inf") and bad.index == (1, 2)
    shape = compare("y", ref, torch.zeros(3, 2))
    assert not shape.ok and "shape (3, 2)" in str(shape)
    assert compare("y", ref[:0], nan[:0]).ok
    both_nan = torch.full((2,), float("nan"), dtype=torch.float64)
    assert compare("y", both_nan, both_nan.float()).ok  # NaN where the reference has NaN is no error


# -- cases, the table, the results file, the plot ---------------------------------------------------


def test_cases():
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
    assert cases.select("all", filter="nope") == []


def test_work_model_and_roofline():
    c = cases.Case("core", "lora", 8, 16, 32, 4)
    flops, nbytes = cases.work(c, "forward")
    assert flops == 2 * 8 * 16 * 32 + 2 * 8 * 4 * (16 + 32)
    assert nbytes == 2 * (8 * 16 + 32 * 16 + 4 * (16 + 32) + 8 * 32)
    # 1 TFLOP at 1000 TFLOP/s is 1 ms; a 2 ms run is at half the roofline
    assert timing.roofline_fraction(1e12, 1.0, 2.0, {"bf16_tflops": 1000.0, "copy_gbps": 1000.0}) == pytest.approx(0.5)


def test_timing_uses_do_bench_on_a_gpu_and_torch_benchmark_on_a_cpu(monkeypatch):
    import triton.testing

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append(("do_bench", kw)) or [1.0, 0.9, 1.2])
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph",
                        lambda fn, **kw: calls.append(("graph", kw)) or [2.0, 1.5, 3.5])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    gpu = torch.device("cuda", 0)  # nothing touches CUDA: the benchmark functions are faked
    t = timing.measure(lambda: None, gpu, rep_ms=50, memory=False)
    assert t == timing.Timing(1.0, 0.9, 1.2) and not t.noisy
    assert calls[0] == ("do_bench", {"warmup": 25.0, "rep": 50, "quantiles": [0.5, 0.2, 0.8]})
    assert timing.measure(lambda: None, gpu, graph=True, memory=False).noisy
    assert calls[1][0] == "graph" and calls[1][1]["quantiles"] == [0.5, 0.2, 0.8]
    cpu = timing.measure(lambda: sum(range(1000)), torch.device("cpu"))
    assert 0 < cpu.p20_ms <= cpu.median_ms <= cpu.p80_ms and cpu.peak_mem_mb is None


def test_gpu_slug():
    assert config.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert config.gpu_slug("NVIDIA H200") == "h200"
    assert config.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert config.gpu_slug("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert config.gpu_slug("cpu") == "cpu"


def _data(device, rows, failures=()):
    gpu = device == "cuda"
    e = {"gpu": "NVIDIA H100 80GB HBM3" if gpu else "cpu", "device": device, "torch": "t", "triton": "t",
         "commit": "abc", "timestamp": "2025-01-01T00:00:00+00:00", "method": timing.method(torch.device(device)),
         "fused_ops_run": "x"}
    return {"env": e, "ceilings": {"bf16_tflops": 800.0, "copy_gbps": 3000.0} if gpu else None,
            "rows": rows, "failures": list(failures)}


def _rows(spread=1.0):
    case = cases.Case("core", "lora", 8192, 4096, 4096, 16)
    times = {"fused": 1.0, "eager": 1.5, "peft": 1.4, "base_linear": 0.9}
    return [report.make_row(case, impl, "forward", timing.Timing(ms, ms / spread**0.5, ms * spread**0.5, 10.0))
            for impl, ms in times.items()]


def test_gpu_table_has_ratios_and_the_cpu_table_does_not():
    gpu = report.format_table(_data("cuda", _rows()))
    assert "eager/fused" in gpu and "1.50x" in gpu and "fused/F.linear" in gpu and "roofline" in gpu
    assert "ceilings (measured in this run): bf16 matmul 800 TFLOP/s" in gpu
    assert report.CPU_CAVEAT not in gpu
    cpu = report.format_table(_data("cpu", _rows()))
    assert "/fused" not in cpu and "roofline =" not in cpu and "MiB" not in cpu.splitlines()[-4]
    assert cpu.count(report.CPU_CAVEAT) == 2
    md = report.format_markdown(_data("cpu", _rows()))
    assert f"**{report.CPU_CAVEAT}" in md and "| case | mode |" in md


def test_noisy_spread_is_flagged():
    assert timing.Timing(1.0, 0.8, 1.3).noisy and not timing.Timing(1.0, 0.9, 1.2).noisy
    assert "1.000~" in report.format_table(_data("cuda", _rows(spread=2.0)))
    assert "~" not in report.format_table(_data("cuda", _rows(spread=1.2))).split("\n\n")[1]


def test_failed_case_without_rows_still_gets_a_line():
    text = report.format_table(_data("cuda", [], failures=[{"case": "lora-M8-K8-N8-r4-bf16", "error": "boom"}]))
    assert "lora-M8-K8-N8-r4-bf16" in text and "FAILED" in text


def test_results_file_is_replaced_not_merged(tmp_path):
    data = _data("cuda", _rows())
    path = report.results_path(tmp_path, data["env"])
    assert path.name == "h100.json"
    report.write(path, data)
    report.write(path, {**data, "rows": data["rows"][:1]})
    assert len(report.load(path)["rows"]) == 1


def test_plot_has_error_bars_and_the_cpu_caveat(tmp_path):
    pytest.importorskip("matplotlib")
    bars = plot._bars(_data("cuda", _rows(spread=2.0)))
    (value, low, high), = [b["fused"] for _, b in bars[("core", "forward")]]
    assert value == pytest.approx(1.0 / 0.9) and low > 0 and high > 0  # relative to F.linear, p20..p80
    assert "base_linear" not in bars[("core", "forward")][0][1]
    assert plot.plot(_data("cuda", _rows()), tmp_path / "gpu.png", lambda s: None).is_file()
    assert plot.plot(_data("cpu", _rows()), tmp_path / "cpu.png", lambda s: None).is_file()


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    log = []
    assert plot.plot(_data("cpu", _rows()), tmp_path / "x.png", log.append) is None
    assert "matplotlib" in log[0] and not (tmp_path / "x.png").exists()

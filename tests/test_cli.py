"""The ``adaptkern`` command: ``bench --quick`` writes a valid results file and says what it is, a
wrong kernel is never timed and fails the run, ``check`` passes, ``info`` stays light, every
subcommand has help. (The harness's parts: tests/test_bench.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaptkern
from adaptkern import cli
from adaptkern.bench import cases, env, impls, report
from adaptkern.ops import config
from adaptkern.bench.run import UsageError, run_bench

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
    if not CUDA:  # every suite by default, the peft column beside fused_peft when peft is here
        assert {r["suite"] for r in data["rows"]} == {s for s in cases.SUITES if not cases.requirement(s)}
        assert {"fuse_peft", "peft"} <= {r["impl"] for r in data["rows"]} or not impls.peft_available()
        assert "fuse_peft" in {r["impl"] for r in data["rows"] if r["suite"] == "core"} or not impls.peft_available()
        assert "peft+fuse ms" in proc.stdout or not impls.peft_available()
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


def test_filter_that_matches_nothing_in_a_new_suite_is_an_error(tmp_path, capsys):
    assert cli.main(["bench", "--suite", "serving", "--filter", "qlora", "--out", str(tmp_path)]) == 2
    assert "matches none of the" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_cli_lists_every_suite():
    assert cli.SUITES == cases.SUITES
    assert cli.build_parser().parse_args(["bench"]).suite == "all"


def test_a_suite_whose_package_is_missing_is_left_out_with_a_reason(tmp_path, monkeypatch):
    from adaptkern.bench.suites import qlora

    monkeypatch.setattr(qlora, "requirement", lambda: "bitsandbytes is not importable (test)")
    with pytest.raises(UsageError, match="suite qlora left out: bitsandbytes is not importable"):
        run_bench("qlora", quick=True, out=str(tmp_path), log=lambda s: None, show=lambda s: None)
    logs = []
    run_bench("all", out=str(tmp_path), filter="M4-", impl_names=("base_linear",), plot=False, log=logs.append,
              show=lambda s: None)
    assert "suite qlora left out: bitsandbytes is not importable (test)" in logs
    ran = [line for line in logs if line.startswith("[")]
    assert ran and not any("qlora-" in line for line in ran)
    assert any("-S1-" in line for line in ran) and any("lora_delta-M4-" in line for line in ran)


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

"""The benchmark harness (``adaptkern.bench``): the cases, the work model and roofline, the timing
methods, the table, the results file and the plot of GPU and CPU runs. (``adaptkern bench`` end to
end: tests/test_cli.py.)"""

import sys

import pytest
import torch

from adaptkern.bench import cases, plot, report, timing


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


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_fuse_peft_impl_is_the_peft_layer_on_the_fused_kernels(mode):
    """``fuse_peft`` times the real peft layer after fuse_peft: PEFT's result (float64 oracle, the unfused
    peft layer as the eager error), computed by adaptkern's kernels (launch count)."""
    pytest.importorskip("peft")
    from adaptkern.bench import impls
    from adaptkern.testing import assert_close

    from .helpers import count_launches

    case = cases.Case("core", "lora", 24, 40, 36, 4, dtype="float32")
    inp = cases.make_core_inputs(case, "cpu")
    with count_launches() as launches:
        fused = impls.build(case, "fuse_peft", mode, inp, "cpu")()
    assert launches["_adapter_linear_onepass_kernel"] + launches["_adapter_linear_split_kernel"] == 1, launches
    peft32 = impls.build(case, "peft", mode, inp, "cpu")()
    inp64 = cases.CoreInputs(**{f: (v.double().detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                                    else v) for f, v in vars(inp).items()})
    peft64 = impls.build(case, "peft", mode, inp64, "cpu")()
    for name, o, e, r in zip(("y",) if mode == "forward" else ("dx", "dA", "dB"),
                             (fused,) if mode == "forward" else fused, (peft32,) if mode == "forward" else peft32,
                             (peft64,) if mode == "forward" else peft64):
        assert_close(name, r, o, e)

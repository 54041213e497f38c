"""The benchmark harness (``adaptkern.bench``): the cases, the work model and roofline, the timing
methods, the table, the results file and the plot of GPU and CPU runs. (``adaptkern bench`` end to
end: tests/test_cli.py.)"""

import sys

import pytest
import torch

from adaptkern.bench import cases, impls, plot, report, timing


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
    wanted = [c for c in core + mixed if c.kind == "lora" and c.M == 8192 and c.rank == 16]
    assert [c for c in cases.select("all", filter="lora,M8192,r16") if c.suite in ("core", "mixed")] == wanted
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


# -- the suites of the newer ops (qlora, dora, bottleneck_norm, serving) ----------------------------------


def test_new_suites_cases_are_the_requested_shapes():
    sel = {s: cases.suite_cases(s) for s in cases.SUITE_MODULES}
    q = sel["qlora"]
    train = {(c.M, c.K, c.N) for c in q if c.variant == "train"}
    assert train == {(m, k, n) for m in (2048, 8192) for k, n in ((4096, 4096), (4096, 14336), (14336, 4096))}
    assert {(c.M, c.K, c.N) for c in q if c.variant == "decode"} == {(m, k, n) for m in (1, 4, 16, 64)
                                                                       for k, n in ((4096, 4096), (4096, 14336))}
    assert {c.rank for c in q} == {16} and all(c.modes == (("forward_backward",) if c.variant == "train"
                                                           else ("forward",)) for c in q)
    assert {(c.M, c.K, c.N, c.rank) for c in sel["dora"]} == {(2048, 4096, 4096, 16), (8192, 4096, 4096, 16)}
    bn = {(c.kind, c.variant, c.M, c.K, c.N, c.rank, c.activation) for c in sel["bottleneck_norm"]}
    assert bn == {(k, "bert", 8192, 4096, 1024, 64, "relu") for k in ("norm_seq_bn", "norm_par_bn")} | \
                 {(k, "llama", 8192, 14336, 4096, 256, "relu") for k in ("norm_seq_bn", "norm_par_bn")}
    qkv = {(c.M, c.num_adapters) for c in sel["serving"] if c.kind == "qkv"}
    assert qkv == {(64, 32), (8192, 32), (64, 1), (64, 128), (8192, 1), (8192, 128)}
    assert {c.M for c in sel["serving"] if c.kind == "lora_delta"} == {1, 16, 64}
    assert all(c.K == 4096 and c.N == 6144 for c in sel["serving"])
    every = cases.select("all") + cases.select("all", gpu=False)
    assert len({c.id for c in every}) == len(every)
    assert "qlora-M8192-K4096-N4096-r16-train-bf16" in {c.id for c in q}
    # --quick keeps the representative rows of every suite (the GPU check's headline rows)
    quick = {c.id for c in cases.select("all", quick=True)}
    assert {"qlora-M8192-K4096-N4096-r16-train-bf16", "qlora-M16-K4096-N4096-r16-decode-bf16",
            "dora-M8192-K4096-N4096-r16-bf16", "norm_seq_bn-M8192-K4096-N1024-r64-relu-bert-bf16",
            "qkv-M64-K4096-N6144-r16-S32-bf16"} <= quick
    assert {c.suite for c in cases.select("all", quick=True, gpu=False)} == set(cases.SUITES)


@pytest.mark.parametrize("suite", list(cases.SUITE_MODULES))
def test_new_suite_smoke_checks_and_times_every_case(suite, tmp_path):
    """Every CPU smoke case of the suite: inputs built, every adaptkern implementation checked against
    float64 (the fused kernels run in the interpreter here), every applicable implementation timed."""
    from adaptkern.bench.impls import peft_available
    from adaptkern.bench.run import run_bench

    if cases.requirement(suite):
        pytest.skip(cases.requirement(suite))
    logs = []
    assert run_bench(suite, out=str(tmp_path), plot=False, log=logs.append, show=lambda s: None) == 0, logs
    data = report.load(next(tmp_path.glob("*.json")))
    assert data["failures"] == []
    todo = cases.suite_cases(suite, gpu=False)
    assert sum("check: ok" in line for line in logs) == len(todo)
    timed = {(r["kind"], r["M"], r["variant"], r["num_adapters"], r["impl"], r["mode"]) for r in data["rows"]}
    for c in todo:
        for impl in impls.for_case(c):
            if impl == "graph_replay" or (impl == "peft" and not peft_available()):
                continue  # a CUDA graph needs a GPU
            for mode in c.modes:
                assert (c.kind, c.M, c.variant, c.num_adapters, impl, mode) in timed, (c.id, impl, mode)
    assert all(r["median_ms"] > 0 for r in data["rows"])


def _wrong(monkeypatch, module, name):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: real(*a, **k) * 1.1)  # 10 %: past any bf16 bound


@pytest.mark.parametrize("suite, names", [("qlora", ("qlora_linear",)), ("dora", ("dora_linear",)),
                                          ("bottleneck_norm", ("bottleneck_norm",)),
                                          ("serving", ("mixed_lora_linear", "add_lora_delta"))])
def test_a_wrong_fused_op_fails_the_new_suites_check(suite, names, monkeypatch):
    from adaptkern.bench.check import check_case

    if cases.requirement(suite):
        pytest.skip(cases.requirement(suite))
    module = cases.SUITE_MODULES[suite]
    case = cases.suite_cases(suite, quick=True, gpu=False)[0]
    inp = cases.make_inputs(case, "cpu")
    assert check_case(case, inp).ok
    for name in names:
        _wrong(monkeypatch, module, name)
    res = check_case(case, inp)
    assert not res.ok and "max error" in res.failures()


def test_qlora_peft_impl_is_peft_on_bitsandbytes_linear4bit():
    """The ``peft`` column of the qlora suite is PEFT's bitsandbytes LoRA layer (matmul_4bit), and it computes
    the QLoRA layer: against the float64 oracle, with the dequant baseline as the eager error."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from adaptkern.bench.suites import qlora
    from adaptkern.ops.quantized_lora_linear.reference import quantized_lora_linear_ref
    from adaptkern.testing import assert_close

    case = qlora.cases(gpu=False)[0]
    inp = qlora.make_inputs(case, "cpu")
    layer = qlora.make_peft_qlora(inp, case.scale)
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer).__name__ == "Linear4bit"
    with torch.no_grad():
        y = layer(inp.x)
        y_dq = quantized_lora_linear_ref(inp.x, inp.w16, None, inp.lora_a, inp.lora_b, case.scale)
        oracle = quantized_lora_linear_ref(inp.x.double(), inp.w16.double(), None, inp.lora_a.double(),
                                           inp.lora_b.double(), case.scale)
    assert_close("peft y", oracle, y, y_dq)


def test_dora_peft_impl_is_peft_dora_layer():
    peft = pytest.importorskip("peft")
    from adaptkern.bench.suites import dora
    from adaptkern.ops.dora_linear.reference import dora_linear_ref
    from adaptkern.testing import assert_close

    case = dora.cases(gpu=False)[0]
    inp = dora.make_inputs(case, "cpu")
    layer = dora.make_peft_dora(inp, case.scale)
    assert isinstance(layer, peft.tuners.lora.layer.Linear) and layer.use_dora["default"]
    args = [inp.x, inp.weight, None, inp.lora_a, inp.lora_b, inp.magnitude]
    with torch.no_grad():
        y = layer(inp.x)
        oracle = dora_linear_ref(*[None if t is None else t.double() for t in args], case.scale)
        eager = dora_linear_ref(*args, case.scale)
    assert_close("peft y", oracle, y, eager)


def test_vllm_eager_baseline_is_the_lora_delta():
    """The serving suite's ``vllm`` baseline adds exactly the LoRA delta of every slice (rows with id -1
    untouched), against ``add_lora_delta_ref`` in float64."""
    from adaptkern.bench.suites import serving
    from adaptkern.ops.lora_delta.reference import add_lora_delta_ref
    from adaptkern.testing import assert_close

    case = serving.cases(gpu=False)[1]
    inp = serving.make_inputs(case, "cpu")
    ids = inp.ids.clone()
    ids[::3] = -1
    y = serving.vllm_lora(inp.y.float().clone(), inp.x.float(), [a.float() for a in inp.lora_a],
                          [b.float() for b in inp.lora_b], ids, inp.scales)
    want = add_lora_delta_ref(inp.y.double(), inp.x.double(), [a.double() for a in inp.lora_a],
                              [b.double() for b in inp.lora_b], inp.scales.double(), None, ids, 0)
    assert_close("y", want, y)
    assert torch.equal(y[::3], inp.y.float()[::3])


def test_new_suites_work_models():
    from adaptkern.bench.suites import serving

    q = cases.Case("qlora", "qlora", 8, 128, 64, 4, variant="decode")
    flops, nbytes = cases.work(q, "forward")
    assert flops == 2 * 8 * 128 * 64 + 2 * 8 * 4 * (128 + 64)
    assert nbytes == 2 * (8 * 128 + 4 * (128 + 64) + 8 * 64) + 128 * 64 / 2 + 128 * 64 / 64 + 4 * 128 * 64 / (64 * 256)
    d = serving._case("lora_delta", 2, 32, 128, 8)
    assert d.N == 192 and serving.slices(d) == (128, 32, 32)
    flops, nbytes = cases.work(d, "forward")
    assert flops == 2 * 2 * 8 * (3 * 128 + 192)  # two active adapters of 32
    assert nbytes == 2 * (2 * 128 + 2 * 2 * 192) + 2 * 2 * 8 * (3 * 128 + 192) + 4 * 2


def test_graph_replay_is_left_out_off_a_gpu():
    from adaptkern.bench.suites import serving

    case = serving.cases(gpu=False)[0]
    inp = serving.make_inputs(case, "cpu")
    with pytest.raises(impls.Unavailable, match="GPU"):
        impls.build(case, "graph_replay", "forward", inp, torch.device("cpu"))
    with pytest.raises(impls.Unavailable, match="not timed for qkv"):
        impls.build(case, "two_launch", "forward", inp, torch.device("cpu"))


@pytest.mark.gpu
def test_graph_replay_with_a_changed_mapping_is_checked_on_a_gpu():
    from adaptkern.bench.check import check_case
    from adaptkern.bench.suites import serving

    case = serving.cases(quick=True)[0]
    inp = serving.make_inputs(case, torch.device("cuda"))
    res = check_case(case, inp)
    assert res.ok, res.failures()
    assert any(c.name.startswith("y (graph replay") for c in res.comparisons)
    fn = impls.build(case, "graph_replay", "forward", inp, torch.device("cuda"))
    assert fn().shape == (case.M, case.N)

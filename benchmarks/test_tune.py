"""The tuner (``benchmarks/tune.py``) and the table schema it writes (``benchmarks/tune_table.py``),
on a CPU: a fake GPU ("fakegpu") whose kernels are never run, the interpreter off for config.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tune
import tune_table
from adaptkern.ops import config

HERE = Path(__file__).resolve().parent
GPU = "cuda:0"  # a device object only: nothing touches CUDA (the GPU name is faked)


def _gemm_entry(**kw):
    return {"block_m": 16, "block_n": 64, "block_k": 64, "group_m": 8, "num_warps": 4, "num_stages": 2, **kw}


def _table(**sections):
    return {"version": 1, "elem": 2, "env": {"gpu": "Fake GPU"}, **sections}


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Lookups on "cuda:0" read tables of a fake GPU kind (none on disk), interpreter off."""
    monkeypatch.setattr(config, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(config, "_device_slug", lambda index: "fakegpu")
    monkeypatch.setattr(config, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    config.clear_caches()
    yield
    config.clear_caches()


def _fake_tuner(p, wrong, times=None):
    """A Tuner whose kernel is 'wrong' (output off by 50 %) for configs ``wrong`` picks, and
    whose timer reads the config the lookup hands out: bigger tiles are faster, unless ``times``
    (config -> ms) says otherwise."""
    ref = torch.ones(4, 4)

    def fn():
        return ref * (1.5 if wrong(config.gemm_config(p.m, p.n, 2, device=GPU)) else 1.0)

    def fake_time(fn):
        fn()
        c = config.gemm_config(p.m, p.n, 2, device=GPU)
        ms = 2.0**41 * (1 + 0.1 * c.num_stages) / (c.block_m**3 * c.block_n**2 * c.block_k)
        return ms if times is None else times.get(c, ms)

    logs = []
    tuner = tune.Tuner(torch.device(GPU), quick=False, log=logs.append)
    tuner.time = fake_time
    return tuner, logs, tune.Problem(fn, ref, ref)


def test_tuner_never_keeps_a_wrong_config_and_keeps_the_fastest(fake_gpu, monkeypatch):
    p = tune.Point("gemm", 1024, 4096, 16)
    tuner, logs, prob = _fake_tuner(p, wrong=lambda c: c.block_n == 256)
    monkeypatch.setattr(tune, "problem", lambda point, device: prob)
    entry = tuner.tune_point(p)
    right = [e for e in tune.stage1(p, False) if e["block_n"] != 256]
    fastest = max(right, key=lambda e: e["block_m"]**3 * e["block_n"]**2 * e["block_k"])
    assert {k: entry[k] for k in ("block_m", "block_n", "block_k")} == \
        {k: fastest[k] for k in ("block_m", "block_n", "block_k")}
    assert entry["num_stages"] == 2  # step 2 found the (fake) cheaper stage count
    assert tuner.rejected == sum(e["block_n"] == 256 for e in tune.stage1(p, False))
    assert any("WRONG" in line and "max error" in line for line in logs)
    assert entry["heuristic_ms"] > entry["ms"] and entry["heuristic"] == tune.heuristic_entry(p)
    tune_table.validate(tune.one_entry_table(p, entry), "entry")


def test_tuner_keeps_the_heuristic_unless_a_candidate_wins_by_min_gain(fake_gpu, monkeypatch):
    p = tune.Point("gemm", 1024, 4096, 16)
    heur = config.GemmConfig(**tune.heuristic_entry(p))
    times = type("Times", (dict,), {"get": lambda self, c, d: 1.0 if c == heur else 0.99})()
    tuner, _, prob = _fake_tuner(p, wrong=lambda c: False, times=times)  # every candidate 1 % faster
    monkeypatch.setattr(tune, "problem", lambda point, device: prob)
    entry = tuner.tune_point(p)
    assert config.GemmConfig(**{k: entry[k] for k in config.GemmConfig._fields}) == heur
    assert entry["ms"] == entry["heuristic_ms"] == 1.0


def test_plan_fits_validates_and_estimates(monkeypatch):
    """The candidates are valid table entries the shared-memory fit leaves alone; the estimate
    (assumed costs, not a measurement) stays within ~8 min, --quick ~2 min."""
    monkeypatch.setattr(config, "interpreting", lambda: False)  # the GPU's heuristics
    config.clear_caches()
    try:
        for kernel in ("gemm", "onepass", "mixed"):
            for p in tune.points(kernel, quick=False):
                cands = tune.stage1(p, quick=False)
                assert cands, p
                for e in cands + tune.stage2(p, cands[0]) + [tune.heuristic_entry(p)]:
                    assert tune.fits(p, e), (p, e)
                    fields = tune_table.launch_fields(kernel)
                    tune_table.validate(tune.one_entry_table(p, {k: e[k] for k in fields if k in e}), p.label)
        assert {p.key for p in tune.points("route", quick=False)} == {"N=4096,R=16", "N=4096,R=64",
                                                                     "N=16384,R=16", "N=16384,R=64"}
        full, quick = tune.estimate(tune.KERNELS, quick=False), tune.estimate(tune.KERNELS, quick=True)
        assert full["seconds"] <= 8.5 * 60 and quick["seconds"] <= 2 * 60, (full, quick)
    finally:
        config.clear_caches()


def test_written_table_round_trips_and_the_library_accepts_it(tmp_path):
    data = _table(
        gemm={"N=16384": {"8192": {**_gemm_entry(), "ms": 1.5, "heuristic_ms": 1.6, "candidates": 12,
                                   "heuristic": _gemm_entry()}},
              "N=4096": {"1": _gemm_entry(), "16": _gemm_entry()}},
        mixed={"K=4096,R=256": {"64": {"block_m": 16, "block_n": 64, "block_k": 64, "num_warps": 4,
                                       "num_stages": 3, "split": 8}}},
        route={"N=4096,R=16": {"1": {"route": "onepass", "ms": 0.1, "heuristic_ms": 0.1, "heuristic": "onepass",
                                     "onepass_ms": 0.1, "split_ms": None}}},
    )
    path = tmp_path / "t.json"
    tune_table.write(path, data)
    text = path.read_text()
    assert json.loads(text) == data == tune_table.read(path)
    assert '   "8192": {"block_m"' in text  # one line per entry
    with config.table_override(data):  # what the tuner writes, the library loads
        pass


def _gemm(entry, shape="N=4096", m="16"):
    return _table(gemm={shape: {m: entry}})


@pytest.mark.parametrize("data, field, message", [
    ([], "top level", "must be an object"),
    ({"elem": 2}, "version", "must be 1"),
    ({"version": 1}, "elem", "dot operand size"),
    ({**_table(), "gemms": {}}, "gemms", "unknown top-level field"),
    (_gemm(_gemm_entry(block_k=48)), "gemm['N=4096']['16']", "block_k must be a power of two, got 48"),
    (_gemm(_gemm_entry(block_m=8)), "gemm['N=4096']['16']", "block_m must be an integer in [16, 256], got 8"),
    (_gemm(_gemm_entry(num_stages="3")), "gemm['N=4096']['16']", "num_stages must be an integer"),
    (_gemm({k: v for k, v in _gemm_entry().items() if k != "num_warps"}), "gemm['N=4096']['16']",
     "missing num_warps"),
    (_gemm({**_gemm_entry(), "num_warp": 4}), "gemm['N=4096']['16']", "unknown field(s) ['num_warp']"),
    (_gemm(_gemm_entry(), shape="N=4000"), "gemm['N=4000']", "not a bucket"),
    (_gemm(_gemm_entry(), shape="4096"), "gemm['4096']", "shape key must look like 'N=4096'"),
    (_gemm(_gemm_entry(), m="M16"), "gemm['N=4096']['M16']", "M keys must be positive integers"),
    (_gemm([16, 64]), "gemm['N=4096']['16']", "entry must be an object"),
    (_table(gemm={"N=4096": {}}), "gemm['N=4096']", "non-empty"),
    (_table(route={"N=4096,R=16": {"1": {"route": "fused"}}}), "route['N=4096,R=16']['1']",
     "route must be one of ('onepass', 'split')"),
    (_table(route={"N=4096,R=128": {"1": {"route": "onepass"}}}), "route['N=4096,R=128']",
     "always take the split route"),
    (_table(mixed={"K=4096,R=16": {"1": {**_gemm_entry(), "split": 0}}}), "mixed['K=4096,R=16']['1']",
     "group_m"),  # group_m is not a mixed field
], ids=lambda v: None)
def test_malformed_table_is_refused_naming_the_field(tmp_path, data, field, message):
    path = tmp_path / "bad.json"
    with pytest.raises(ValueError) as info:
        tune_table.write(path, data)
    text = str(info.value)
    assert str(path) in text and field in text and message in text, text
    assert not path.exists()


def test_unreadable_table_names_the_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="line 1 column 2: not valid JSON"):
        tune_table.read(path)


def test_without_cuda_exits_2_and_writes_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(HERE / "tune.py"), "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "Nothing was written" in proc.stderr
    assert not out.exists()


def test_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        tune.main([])  # --out is required: the tuner never picks a file inside the package itself
    assert info.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        tune.main(["--out", "x.json", "--kernels", "gemm,bogus"])
    assert info.value.code == 2 and "unknown kernel(s) bogus" in capsys.readouterr().err

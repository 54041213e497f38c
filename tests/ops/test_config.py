"""Per-GPU config tables (adaptkern/ops/configs): nearest-M lookup, fallbacks to the heuristic,
the shared-memory fit, schema errors, the shipped tables (the tuner that writes them: benchmarks/test_tune.py).

The lookup runs on a CPU here: a fake table in tmp_path, the GPU name faked ("fakegpu"), and
the interpreter switched off for config.py alone (no kernel runs in these tests, except in
``test_launchers_pass_the_device``, which leaves the interpreter on).
"""

import itertools
import json
from pathlib import Path

import pytest
import torch

import adaptkern
from adaptkern.ops import config

REPO = Path(__file__).resolve().parents[2]
GPU = "cuda:0"  # a device object only: nothing touches CUDA (the slug is faked)
MS = (1, 16, 64, 256, 1024, 2048, 4096, 8192)


def _gemm_entry(**kw):
    e = {"block_m": 16, "block_n": 64, "block_k": 64, "group_m": 8, "num_warps": 4, "num_stages": 2}
    e.update(kw)
    return e


def _table(**sections):
    return {"version": 1, "elem": 2, "env": {"gpu": "Fake GPU"}, **sections}


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """Write ``fakegpu.json`` with ``write(data)``; lookups on "cuda:0" read it, interpreter off."""
    monkeypatch.setattr(config, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(config, "_device_slug", lambda index: "fakegpu")
    monkeypatch.setattr(config, "interpreting", lambda: False)
    config.clear_caches()

    def write(data, raw=None):
        path = tmp_path / "fakegpu.json"
        path.write_text(raw if raw is not None else json.dumps(data))
        config.clear_caches()
        return path

    yield write
    config.clear_caches()


def _heuristic_gemm(m, n, elem=2):
    return config.gemm_config(m, n, elem)  # device=None: never a table


# -- nearest M ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m, want", [
    (0, 1), (1, 1), (2, 1), (4, 1),  # 4 is 2 octaves from 1 and from 16: tie -> the smaller
    (5, 16), (16, 16), (32, 16),  # 32: tie between 16 and 64
    (33, 64), (128, 64), (129, 256),  # 128: tie between 64 and 256
    (1500, 2048), (1448, 1024), (2896, 2048), (2897, 4096),  # 2896² < 2048·4096 < 2897²
    (8192, 8192), (100000, 8192),
])
def test_nearest_m_in_log2_distance_ties_to_smaller(m, want):
    assert MS[config.nearest_m(MS, m)] == want
    # the same by floating-point log2 distance (where it is not a tie)
    import math
    dist = [abs(math.log2(max(m, 1)) - math.log2(v)) for v in MS]
    best = min(dist)
    assert want == min(v for v, d in zip(MS, dist) if abs(d - best) < 1e-12)


def test_gemm_lookup_takes_the_nearest_measured_m(tables):
    # group_m tells the entries apart (the shared-memory fit never changes it)
    tables(_table(gemm={"N=4096": {str(m): _gemm_entry(group_m=i + 1) for i, m in enumerate((1, 16, 256, 4096))}}))
    got = {m: config.gemm_config(m, 4096, device=GPU).group_m for m in (1, 3, 4, 5, 16, 63, 64, 65, 1024, 1025, 9000)}
    assert got == {1: 1, 3: 1, 4: 1, 5: 2, 16: 2, 63: 2, 64: 2, 65: 3, 1024: 3, 1025: 4, 9000: 4}
    # N is bucketed to the next power of two: 3000 and 4096 share "N=4096"
    assert config.gemm_config(16, 3000, device=GPU).group_m == 2
    assert config.gemm_config(16, 4096, device=torch.device("cuda", 0)).group_m == 2


def test_every_kernel_reads_its_section(tables):
    tables(_table(
        onepass={"N=16384,R=16": {"64": _gemm_entry(block_m=64, block_n=128, group_m=3)}},
        mixed={"K=4096,R=64": {"16": {"block_m": 16, "block_n": 256, "block_k": 32, "num_warps": 8,
                                      "num_stages": 4, "split": 2}},
               "K=4096,R=16": {"16": {"block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 4,
                                      "num_stages": 3}}},
        route={"N=4096,R=16": {"1": {"route": "split"}, "8192": {"route": "onepass"}}},
    ))
    assert config.onepass_config(64, 14336, 8, device=GPU) == config.GemmConfig(64, 128, 64, 3, 4, 2)
    plan = config.mixed_plan(16, 4096, 40, device=GPU)  # rank 40 -> R=64
    assert (plan.block_m, plan.block_n, plan.block_k, plan.num_warps, plan.num_stages, plan.split) == \
        (16, 256, 32, 8, 4, 2)
    assert plan.block_r == 64 and plan.sort_rows is False  # the heuristic's
    plan = config.mixed_plan(16, 4096, 16, device=GPU)  # no split in the entry: the heuristic's
    assert plan.split == config.mixed_plan(16, 4096, 16).split and plan.block_m == 64
    # the table's route, against the heuristic's (onepass at M=1, split at M=8192)
    assert config.choose_route(1, 16, n=4096, device=GPU) == "split"
    assert config.choose_route(8192, 16, n=4096, device=GPU) == "onepass"
    assert config.choose_route(8192, 16, True, n=4096, device=GPU) == "split"  # dropout: always split
    assert config.choose_route(8192, 16, device=GPU) == "split"  # no n: heuristic
    assert config.choose_route(8192, 100, n=4096, device=GPU) == "split"  # rank > 64: always split


# -- fallbacks ---------------------------------------------------------------------------------


def test_fallbacks_to_the_heuristic(tables, monkeypatch):
    heur = {m: _heuristic_gemm(m, 4096) for m in (1, 64, 8192)}
    # no file for this GPU
    for m, cfg in heur.items():
        assert config.gemm_config(m, 4096, device=GPU) == cfg
    assert config.choose_route(8192, 16, n=4096, device=GPU) == "split"
    tables(_table(gemm={"N=4096": {"1": _gemm_entry(group_m=5)}}))
    assert config.gemm_config(8192, 4096, device=GPU).group_m == 5  # the table is in use ...
    assert config.gemm_config(8192, 8192, device=GPU) == _heuristic_gemm(8192, 8192)  # ... shape missing
    assert config.gemm_config(8192, 4096, 4, device=GPU) == _heuristic_gemm(8192, 4096, 4)  # tuned for elem 2
    assert config.onepass_config(64, 4096, 16, device=GPU) == config.onepass_config(64, 4096, 16)  # kernel missing
    assert config.mixed_plan(64, 4096, 16, device=GPU) == config.mixed_plan(64, 4096, 16)
    assert config.choose_route(1, 16, n=4096, device=GPU) == "onepass"
    assert config.gemm_config(8192, 4096, device=None) == heur[8192]  # no device
    assert config.gemm_config(8192, 4096, device="cpu") == heur[8192]  # not CUDA
    # under the interpreter: the interpreter's heuristic, whatever the table says
    monkeypatch.setattr(config, "interpreting", lambda: True)
    config.clear_caches()
    interp = config.GemmConfig(64, 64, 64, 4, 4, 1)
    assert config.gemm_config(8192, 4096, device=GPU) == interp
    assert config.onepass_config(8192, 4096, 16, device=GPU) == interp


def test_lookups_are_cached_no_file_io_per_call(tables, monkeypatch):
    path = tables(_table(gemm={"N=4096": {"16": _gemm_entry(group_m=7)}}))
    assert config.gemm_config(16, 4096, device=GPU).group_m == 7
    path.unlink()

    def no_io(*a, **k):
        raise AssertionError("a lookup read a file")

    monkeypatch.setattr(Path, "read_text", no_io)
    monkeypatch.setattr(Path, "is_file", no_io)
    for m in (1, 3, 100, 5000):  # new M values: cached table, no file access
        assert config.gemm_config(m, 4096, device=GPU).group_m == 7


def test_table_override_is_a_loader_hook(tables):
    tables(_table(gemm={"N=4096": {"16": _gemm_entry(group_m=7)}}))
    with config.table_override(_table(gemm={"N=4096": {"16": _gemm_entry(group_m=9)}})):
        assert config.gemm_config(16, 4096, device=GPU).group_m == 9
        with config.table_override({"version": 1, "elem": 2}):  # empty: the heuristic
            assert config.gemm_config(16, 4096, device=GPU) == _heuristic_gemm(16, 4096)
        assert config.gemm_config(16, 4096, device=GPU).group_m == 9
    assert config.gemm_config(16, 4096, device=GPU).group_m == 7


# -- the shared-memory fit ---------------------------------------------------------------------


def test_table_entry_too_big_for_shared_memory_is_shrunk_by_fit(tables):
    big = _gemm_entry(block_m=256, block_n=256, block_k=256, num_warps=8, num_stages=8)
    tables(_table(gemm={"N=4096": {"64": big}}, onepass={"N=4096,R=64": {"64": big}}))
    raw = config.GemmConfig(256, 256, 256, 8, 8, 8)
    assert config._smem(raw, 2) > config.SMEM_BUDGET
    cfg = config.gemm_config(64, 4096, device=GPU)
    assert cfg == config.fit(raw, 2) and cfg != raw
    assert config._smem(cfg, 2) <= config.SMEM_BUDGET
    one = config.onepass_config(64, 4096, 64, device=GPU)
    assert one == config.fit(raw, 2, extra_cols=64)
    assert config._smem(one, 2, extra_cols=64) <= config.SMEM_BUDGET


def test_fit_always_reaches_the_budget_within_the_schema_bounds():
    """Every entry the schema admits fits after _fit, for every operand size and rank tile."""
    sizes = (16, 32, 64, 128, 256)
    for bm, bn, bk, stages in itertools.product(sizes, sizes, sizes, range(1, 9)):
        raw = config.GemmConfig(bm, bn, bk, 8, 8, stages)
        for elem, extra in itertools.product((2, 4, 8), (0, 16, 64, 128)):
            assert config._smem(config.fit(raw, elem, extra), elem, extra) <= config.SMEM_BUDGET, (raw, elem, extra)


# -- malformed tables ---------------------------------------------------------------------------
# The schema (fields, bounds) is the tuner's to check when it writes a table
# (benchmarks/test_tune.py); the loader refuses what it cannot index, naming the file.


@pytest.mark.parametrize("data, raw, message", [
    (None, "{not json", "not valid JSON"),
    ([], None, "malformed"),
    ({"version": 1}, None, "malformed"),
    ({"version": 1, "elem": 2, "gemm": {"N=4096": {"M16": {}}}}, None, "malformed"),
    ({"version": 1, "elem": 2, "gemm": {"N=4096": [1]}}, None, "malformed"),
], ids=["json", "top-level", "elem", "m-key", "by-m"])
def test_malformed_table_raises_naming_the_file(tables, data, raw, message):
    path = tables(data, raw)
    with pytest.raises(ValueError) as info:
        config.gemm_config(16, 4096, device=GPU)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


def test_shipped_tables_are_valid():
    """Every table in adaptkern/ops/configs loads (none exists yet: the README says so)."""
    folder = REPO / "adaptkern" / "ops" / "configs"
    assert (folder / "README.md").is_file() and (folder / "NOTES.md").is_file()
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        config.index_table(data, str(path))
        assert data["env"]["gpu"], path
        assert path.stem == data["env"].get("slug", path.stem), path


# -- the launchers pass the device -------------------------------------------------------------


def test_launchers_pass_the_device(monkeypatch):
    """The launchers hand config their tensor's device (and the route its N), so a table can apply."""
    calls = []
    for name in ("gemm_config", "onepass_config", "mixed_plan", "choose_route"):
        real = getattr(config, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(config, name, spy)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=gen, requires_grad=True)
    w, a, b = torch.randn(24, 32, generator=gen), torch.randn(4, 32, generator=gen), torch.randn(24, 4, generator=gen)
    adaptkern.lora_linear(x, w, None, a, b, scale=1.0).sum().backward()
    adaptkern.lora_linear(x, w, None, a, b, scale=1.0, route="split")
    adaptkern.mixed_lora_linear(x, w, None, a[None], b[None], torch.zeros(5, dtype=torch.int32),
                                scales=torch.ones(1)).sum().backward()
    seen = {name for name, _ in calls}
    if config.interpreting():  # the kernels ran (else the reference did, and nothing was looked up)
        assert seen == {"gemm_config", "onepass_config", "mixed_plan", "choose_route"}, seen
    for name, kwargs in calls:
        if name == "gemm_config" and "device" not in kwargs:
            continue  # the mixed backward's segment GEMM: a kernel no table covers
        assert kwargs.get("device") == x.device, (name, kwargs)
        if name == "choose_route":
            assert kwargs.get("n") == 24


def test_gpu_slug():
    assert config.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert config.gpu_slug("NVIDIA H200") == "h200"
    assert config.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert config.gpu_slug("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert config.gpu_slug("cpu") == "cpu"

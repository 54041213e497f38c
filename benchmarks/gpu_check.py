"""Helpers of ``benchmarks/gpu_check.sh`` (the one prepared GPU call, docs/gpu-runbook.md).

    python benchmarks/gpu_check.py cpu-report --json CPU.json [--scenarios A,B] [--jobs N]
    python benchmarks/gpu_check.py compiled --cpu-report CPU.json [--json GPU.json] [--scenarios A,B]
    python benchmarks/gpu_check.py results --bench DIR [--graph DIR] --out OUTDIR

``cpu-report``: ``benchmarks/kernel_report.py`` (its command line only), one process per scenario
of :data:`SCENARIOS`, in parallel, rows merged into one JSON: a scenario that does not compile
loses only its own rows, and the others can still be cross-checked.

``compiled`` (CUDA only): runs the scenarios of ``benchmarks/kernel_report.py`` on the GPU
through the public API (``adaptkern.lora_linear``, ``bottleneck_linear``, ``mixed_lora_linear``),
records every Triton launch with the kernel the JIT compiled for it, and reads each loaded
kernel's facts from the CUDA driver: registers, local memory (stack frame, spills included),
shared memory, resident CTAs per SM (``cuOccupancyMaxActiveBlocksPerMultiprocessor``), the
cubin's architecture, and wgmma/mma.sync from its SASS. Each launch is matched with the CPU
report's row of the same scenario (kernel, grid, tiles, warps, stages, flags) and compared;
exit status 1 when a fact differs, a launch is on one side only, or nothing matched.

``results``: copies the ``adaptkern bench`` results files to ``OUTDIR/benchmarks/results/``
(``OUTDIR/benchmarks/results-cpu-smoke/`` for a CPU smoke run: never committed) and writes
``OUTDIR/targets.md``, the measured rows of each performance target with their ratios. Exit
status 1 when a GPU run lacks a target's row or a results file lists failures.

Only the public API of adaptkern is used (module paths inside ``adaptkern.ops`` may move), the
results files are read by their documented schema (benchmarks/README.md), and the CPU report by
its ``--json`` rows.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# --------------------------------------------------------------------------------------------
# results: copy the results files, write the targets table

# (title, file: "eager" or "graph", row selector, what to show)
TARGETS = (
    ("LoRA r=16 M=8192 fwd+bwd", dict(suite="core", kind="lora", M=8192, rank=16, mode="forward_backward"),
     ("eager/fused", "peft/fused", "fused/F.linear")),
    ("LoRA r=16 M=8192 forward", dict(suite="core", kind="lora", M=8192, rank=16, mode="forward"),
     ("fused/F.linear", "eager/fused", "peft/fused")),
    ("sequential bottleneck R=256 M=8192 fwd+bwd",
     dict(suite="core", kind="bottleneck_sequential", M=8192, rank=256, mode="forward_backward"),
     ("eager/fused", "fused/F.linear")),
    ("sequential bottleneck R=256 M=8192 forward",
     dict(suite="core", kind="bottleneck_sequential", M=8192, rank=256, mode="forward"),
     ("fused/F.linear", "eager/fused")),
    ("mixed decode M=64, 32 adapters", dict(suite="mixed", M=64, num_adapters=32, mode="forward"),
     ("fused/F.linear", "eager/fused")),
    ("mixed prefill M=8192, 8 adapters", dict(suite="mixed", M=8192, num_adapters=8, mode="forward"),
     ("fused/F.linear", "eager/fused")),
    ("mixed M=256, 1 adapter", dict(suite="mixed", M=256, num_adapters=1, mode="forward"),
     ("fused/F.linear", "eager/fused")),
    ("mixed M=256, 128 adapters", dict(suite="mixed", M=256, num_adapters=128, mode="forward"),
     ("fused/F.linear", "eager/fused")),
    ("QLoRA NF4 r=16 M=8192 fwd+bwd", dict(suite="qlora", M=8192, variant="train", mode="forward_backward"),
     ("peft/fused", "dequant/fused", "fused/F.linear")),
    ("QLoRA NF4 decode M=16 (goal: below bf16 F.linear)", dict(suite="qlora", M=16, variant="decode", mode="forward"),
     ("fused/F.linear", "peft/fused", "dequant/fused")),
    ("DoRA r=16 M=8192 fwd+bwd (goal: fused/LoRA <= 1.1)", dict(suite="dora", M=8192, mode="forward_backward"),
     ("fused/lora", "peft/fused", "fused/F.linear")),
    ("norm-fused seq_bn BERT M=8192 fwd+bwd", dict(suite="bottleneck_norm", kind="norm_seq_bn", variant="bert",
                                                 M=8192, K=4096, N=1024, mode="forward_backward"),
     ("eager/fused", "fused/F.linear")),
    ("norm-fused seq_bn BERT M=8192 forward", dict(suite="bottleneck_norm", kind="norm_seq_bn", variant="bert",
                                                 M=8192, K=4096, N=1024, mode="forward"),
     ("eager/fused", "fused/F.linear")),
    ("q/k/v decode M=64, 32 adapters", dict(suite="serving", kind="qkv", M=64, num_adapters=32, N=6144,
                                            mode="forward"),
     ("fused/F.linear", "vllm/fused", "delta/fused", "graph_replay/fused")),
)


def _rows(data: dict, sel: dict) -> dict:
    """{impl: row} of the rows matching ``sel`` (bf16 and K=N=4096 unless ``sel`` says otherwise)."""
    want = {"dtype": "bfloat16", "K": 4096, "N": 4096, **sel}
    return {r["impl"]: r for r in data.get("rows", []) if all(r.get(k) == v for k, v in want.items())}


def _ratio(impls: dict, key: str) -> Optional[float]:
    a, b = key.split("/")
    name = {"F.linear": "base_linear"}  # the other names are the impls' own
    ra, rb = impls.get(name.get(a, a)), impls.get(name.get(b, b))
    if not ra or not rb or not rb.get("median_ms"):
        return None
    return ra["median_ms"] / rb["median_ms"]


def targets_table(files: dict) -> tuple[str, list[str]]:
    """The Markdown table of the targets from ``{"eager": data, "graph": data}``; and the
    targets with no row (GPU runs only)."""
    lines = ["| target | timing | fused ms | ratios (x/fused > 1: fused faster; fused/F.linear: cost over "
             "the frozen layer) | met? |", "|---|---|---:|---|---|"]
    missing = []
    for title, sel, shown in TARGETS:
        found = False
        for label, data in files.items():
            if data is None:
                continue
            impls = _rows(data, sel)
            if not impls:
                continue
            found = True
            fused = impls.get("fused")
            ratios = []
            for key in shown:
                v = _ratio(impls, key)
                if v is not None:
                    ratios.append(f"{key} {v:.2f}x")
            how = "CUDA-graph replays" if label == "graph" else "do_bench, L2 cleared"
            ms = f"{fused['median_ms']:.4f}" if fused else "FAILED/absent"
            lines.append(f"| {title} | {how} | {ms} | {', '.join(ratios) or '-'} | (fill in: the target) |")
        if not found:
            missing.append(title)
            lines.append(f"| {title} | - | not measured | - | - |")
    for a, b in (("graph", "mixed M=256: 128 vs 1 adapters"), ("eager", "mixed M=256: 128 vs 1 adapters")):
        data = files.get(a)
        one = (_rows(data, dict(suite="mixed", M=256, num_adapters=1, mode="forward")) if data else {}).get("fused")
        many = (_rows(data, dict(suite="mixed", M=256, num_adapters=128, mode="forward")) if data else {}).get("fused")
        if one and many:
            how = "CUDA-graph replays" if a == "graph" else "do_bench, L2 cleared"
            lines.append(f"| {b} | {how} | {many['median_ms']:.4f} vs {one['median_ms']:.4f} | "
                         f"S=128 / S=1 {many['median_ms'] / one['median_ms']:.2f}x | (fill in) |")
    ceil = []
    for label, data in files.items():
        c = (data or {}).get("ceilings")
        if c:
            run = "graph run" if label == "graph" else "main run"
            ceil.append(f"{run}: bf16 matmul {c['bf16_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s")
    head = []
    for label, data in files.items():
        if data is not None:
            env = data.get("env", {})
            head.append(f"{label}: {env.get('gpu')} ({env.get('device')}), torch {env.get('torch')}, triton "
                        f"{env.get('triton')}, commit {env.get('commit')}, {env.get('timestamp')}")
    text = "\n".join(["Measured targets (benchmarks/gpu_check.sh)", ""] + [f"- {h}" for h in head]
                     + [f"- ceilings measured in the same run: {'; '.join(ceil) or 'none (not a GPU run)'}", ""]
                     + lines) + "\n"
    return text, missing


def _load_results(folder: Optional[str]) -> tuple[Optional[Path], Optional[dict]]:
    if not folder or not Path(folder).is_dir():
        return None, None
    files = sorted(p for p in Path(folder).glob("*.json"))
    if not files:
        return None, None
    if len(files) > 1:
        print(f"note: {folder} holds {len(files)} results files; using {files[0].name}")
    return files[0], json.loads(files[0].read_text())


def cmd_results(args) -> int:
    out = Path(args.out)
    found = {label: _load_results(folder) for label, folder in (("eager", args.bench), ("graph", args.graph))}
    if found["eager"][0] is None:
        print(f"results: no results file in {args.bench} (did the bench step run?)")
        return 1
    status = 0
    for label, (path, data) in found.items():
        if path is None:
            print(f"results: no {label} results file ({args.graph if label == 'graph' else args.bench})")
            continue
        gpu = data.get("env", {}).get("device") == "cuda"
        dest = out / "benchmarks" / ("results" if gpu else "results-cpu-smoke")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / path.name)
        print(f"results: {path} -> {dest / path.name}" + ("" if gpu else "  (CPU smoke test: never commit it)"))
        if data.get("failures"):
            status = 1
            for f in data["failures"]:
                print(f"results: FAILED case {f.get('case')}: {f.get('error')}")
    data = {label: d for label, (_, d) in found.items()}
    text, missing = targets_table(data)
    (out / "targets.md").write_text(text)
    print(text)
    gpu = (data["eager"] or {}).get("env", {}).get("device") == "cuda"
    if missing and gpu:
        print(f"results: no row for {len(missing)} target(s): {', '.join(missing)}")
        status = 1
    elif missing:
        print("results: CPU smoke shapes only, so no target row (expected off a GPU)")
    return status


# --------------------------------------------------------------------------------------------
# compiled: the report's scenarios on the GPU, facts from the driver

# CUfunction_attribute
_ATTR = {"shared_static": 1, "local": 3, "regs": 4, "binary_version": 6}


class Driver:
    """The few CUDA driver calls needed, through ctypes (libcuda, as loaded by torch)."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def _check(self, rc: int, what: str):
        if rc != 0:
            raise RuntimeError(f"{what} failed: CUresult {rc}")

    def attr(self, function: int, name: str) -> int:
        v = ctypes.c_int()
        self._check(self.lib.cuFuncGetAttribute(ctypes.byref(v), ctypes.c_int(_ATTR[name]), ctypes.c_void_p(function)),
                    f"cuFuncGetAttribute({name})")
        return v.value

    def occupancy(self, function: int, threads: int, dyn_smem: int) -> int:
        n = ctypes.c_int()
        self._check(self.lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(n), ctypes.c_void_p(function), ctypes.c_int(threads), ctypes.c_size_t(dyn_smem)),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        return n.value


_FLAG_KEYS = ("HAS_SECOND", "EPILOGUE", "DROP", "DROPOUT", "SPLIT_K", "SORTED", "ACT", "STORE_Z")


def tiles_of(kw: dict) -> str:
    """The report's tile string: BLOCK_M×BLOCK_N×BLOCK_K [rBLOCK_R] [k2BLOCK_K2]."""
    t = "×".join(str(kw.get(b, "-")) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return t + "".join(f" {tag}{kw[b]}" for b, tag in (("BLOCK_R", "r"), ("BLOCK_K2", "k2")) if b in kw)


def flags_of(kw: dict) -> str:
    """The report's flag string (the constexpr switches that change the kernel)."""
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in kw.items()
                    if k in _FLAG_KEYS and v not in (0, False))


def mma_of(sass: str) -> str:
    kinds = set(re.findall(r"\b(HGMMA|HMMA|DMMA|IMMA)\b", sass))
    names = {"HGMMA": "wgmma", "HMMA": "mma.sync", "DMMA": "dmma", "IMMA": "imma"}
    return "+".join(sorted(names[k] for k in kinds)) or "fma"


def _nvdisasm(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    exe = str(tool) if tool.exists() else (shutil.which("nvdisasm") or "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([exe, "-c", f.name], capture_output=True, text=True, check=True).stdout


class Recorder:
    """Wraps ``JITFunction.run``: every launch's kernel name, grid, constexprs and compiled kernel."""

    def __init__(self):
        from triton.runtime.jit import JITFunction

        self.cls, self.orig, self.launches = JITFunction, JITFunction.run, None

    def __enter__(self):
        orig, rec = self.orig, self

        def run(fn, *args, grid, warmup, **kwargs):
            kw = dict(kwargs)
            kernel = orig(fn, *args, grid=grid, warmup=warmup, **kwargs)
            if rec.launches is not None and not warmup and kernel is not None:
                rec.launches.append((fn, grid, kw, kernel))
            return kernel

        self.cls.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.orig


# The report's scenarios this check reproduces on the GPU (names as in kernel_report.py): its
# bf16 "report" group, the hot launches among them.
SCENARIOS = ("lora r16 M8192 train", "lora r16 M8192 onepass", "lora r16 M1024 fwd", "lora r16 M16 decode",
             "lora r64 M256 fwd", "lora r16 M8192 dropout", "mixed S32 r16 M8192", "mixed S32 r16 M64 decode",
             "mixed S32 r16 M16 decode", "bottleneck R256 M8192 gelu", "mixed S32 r16 M8192 train")


def _names(arg: Optional[str]) -> list[str]:
    names = [n.strip() for n in (arg or "").split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    return names


def scenarios(torch, adaptkern):
    """(name, body) for each of :data:`SCENARIOS`, through the public API on CUDA tensors."""
    dev, bf, K, N = "cuda", torch.bfloat16, 4096, 4096
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, std=1.0, dtype=bf, grad=False):
        t = (torch.randn(shape, generator=g, device=dev) * std).to(dtype)
        return t.requires_grad_(grad)

    def lora(m, r, *, train=True, dropout=0.0, route="auto"):
        def body():
            x, w = rnd(m, K, grad=train), rnd(N, K, std=K**-0.5)
            a, b = rnd(r, K, std=K**-0.5, grad=train), rnd(N, r, std=r**-0.5, grad=train)
            with torch.set_grad_enabled(train):
                y = adaptkern.lora_linear(x, w, None, a, b, scale=2.0, dropout=dropout, route=route)
                if train:
                    y.backward(rnd(m, N))
        return body

    def bottleneck(m, r):
        def body():
            x, w, bias = rnd(m, K, grad=True), rnd(N, K, std=K**-0.5), rnd(N)
            d, db = rnd(r, K, std=K**-0.5, grad=True), rnd(r, grad=True)
            u, ub = rnd(N, r, std=r**-0.5, grad=True), rnd(N, grad=True)
            y = adaptkern.bottleneck_linear(x, w, bias, d, db, u, ub, activation="gelu", placement="parallel")
            y.backward(rnd(m, N))
        return body

    def mixed(m, r, s, *, train=False):
        def body():
            x, w = rnd(m, K, grad=train), rnd(N, K, std=K**-0.5)
            a, b = rnd(s, r, K, std=K**-0.5, grad=train), rnd(s, N, r, std=r**-0.5, grad=train)
            ids = torch.randint(-1, s, (m,), dtype=torch.int32, device=dev, generator=g)
            scales = torch.ones(s, device=dev)
            with torch.set_grad_enabled(train):
                y = adaptkern.mixed_lora_linear(x, w, None, a, b, ids, scales=scales)
                if train:
                    y.backward(rnd(m, N))
        return body

    return [
        ("lora r16 M8192 train", lora(8192, 16)),
        ("lora r16 M8192 onepass", lora(8192, 16, train=False, route="onepass")),
        ("lora r16 M1024 fwd", lora(1024, 16, train=False)),
        ("lora r16 M16 decode", lora(16, 16, train=False)),
        ("lora r64 M256 fwd", lora(256, 64, train=False)),
        ("lora r16 M8192 dropout", lora(8192, 16, dropout=0.1)),
        ("mixed S32 r16 M8192", mixed(8192, 16, 32)),
        ("mixed S32 r16 M64 decode", mixed(64, 16, 32)),
        ("mixed S32 r16 M16 decode", mixed(16, 16, 32)),
        ("bottleneck R256 M8192 gelu", bottleneck(8192, 256)),
        ("mixed S32 r16 M8192 train", mixed(8192, 16, 32, train=True)),
    ]


FACTS = ("regs", "local", "smem", "ctas_sm", "mma")


def cpu_facts(row: dict) -> dict:
    """The CPU report row's facts under the names compared here."""
    f = row.get("facts") or {}
    return {"regs": f.get("regs"), "local": f.get("stack"), "smem": f.get("smem"), "ctas_sm": f.get("ctas_sm"),
            "mma": f.get("mma")}


def key_of(rec: dict) -> tuple:
    return (rec["scenario"], rec["kernel"], rec["grid"], rec["tiles"], rec["warps"], rec["stages"], rec["flags"])


def compare(gpu_rows: list[dict], cpu_rows: list[dict]) -> tuple[list[dict], list[str], int]:
    """Match GPU launches with CPU report rows of the same scenario; returns (one line per
    launch, problems, launches matched). Scenarios the CPU report lacks are not compared."""
    by_key: dict = {}
    for r in cpu_rows:
        by_key.setdefault(key_of(r), []).append(r)
    cpu_scenarios = {r["scenario"] for r in cpu_rows}
    used: dict = {}
    lines, problems, matched = [], [], 0
    for g in gpu_rows:
        line = dict(g, cpu=None, status="")
        k = key_of(g)
        if g["scenario"] not in cpu_scenarios:
            line["status"] = "not in the CPU report (scenario absent): not compared"
            lines.append(line)
            continue
        cands = by_key.get(k, [])
        i = used.get(k, 0)
        if not cands:
            line["status"] = "MISMATCH: launched on the GPU, not in the CPU report's capture"
            problems.append(f"{g['scenario']} / {g['kernel']} grid {g['grid']} tiles {g['tiles']}: {line['status']}")
            lines.append(line)
            continue
        c = cands[min(i, len(cands) - 1)]
        used[k] = i + 1
        cf = cpu_facts(c)
        line["cpu"] = cf
        line["role"] = c.get("role")
        diff = [f"{n} GPU {g['facts'][n]} vs CPU {cf[n]}" for n in FACTS if g["facts"].get(n) != cf.get(n)]
        matched += 1
        if diff:
            line["status"] = "MISMATCH: " + "; ".join(diff)
            problems.append(f"{g['scenario']} / {c.get('role')}: {line['status']}")
        else:
            line["status"] = "ok"
        lines.append(line)
    gpu_scenarios = {g["scenario"] for g in gpu_rows}
    for k, cands in by_key.items():
        extra = len(cands) - used.get(k, 0)
        if k[0] in gpu_scenarios and extra > 0:
            problems.append(f"{k[0]} / {cands[0].get('role')} ({k[1]} grid {k[2]}): in the CPU report "
                            f"{extra}x more than launched on the GPU")
    return lines, problems, matched


def _fmt(lines: list[dict]) -> str:
    head = ("scenario", "launch", "kernel", "grid", "tile", "w", "st", "regs gpu/cpu", "local", "smem",
            "CTA/SM gpu/cpu", "mma gpu/cpu", "status")
    body = []
    for ln in lines:
        f, c = ln["facts"], ln["cpu"] or {}
        body.append((ln["scenario"], ln.get("role") or "?", ln["kernel"].strip("_"), ln["grid"], ln["tiles"],
                     str(ln["warps"]), str(ln["stages"]), f"{f['regs']}/{c.get('regs', '-')}",
                     f"{f['local']}/{c.get('local', '-')}", f"{f['smem']}/{c.get('smem', '-')}",
                     f"{f['ctas_sm']}/{c.get('ctas_sm', '-')}", f"{f['mma']}/{c.get('mma', '-')}", ln["status"]))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.ljust(w) for x, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(out)


def cmd_compiled(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("compiled: needs a CUDA GPU (this step runs the report's launches on the real GPU)")
        return 2
    import triton

    import adaptkern

    torch.cuda.init()
    props = torch.cuda.get_device_properties(0)
    print(f"compiled: {props.name}, {props.multi_processor_count} SMs, sm_{props.major}{props.minor}; "
          f"triton {triton.__version__}, torch {torch.__version__}")
    drv = Driver()
    gpu_rows, errors, mma_cache = [], [], {}
    only = set(_names(args.scenarios))
    for name, body in scenarios(torch, adaptkern):
        if name not in only:
            continue
        t0 = time.time()
        rec = Recorder()
        rec.launches = []
        try:
            with rec:
                body()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and go on with the next scenario
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"  {name}: RAISED {errors[-1]}")
            continue
        for fn, grid, kw, kernel in rec.launches:
            try:
                if hasattr(kernel, "_init_handles"):
                    kernel._init_handles()
                func = int(kernel.function)
                md = kernel.metadata
                warps, shared = int(md.num_warps), int(md.shared)
                stages = int(getattr(md, "num_stages", kw.get("num_stages", 0)))
                if id(kernel) not in mma_cache:
                    mma_cache[id(kernel)] = mma_of(_nvdisasm(kernel.asm["cubin"]))
                facts = {"regs": drv.attr(func, "regs"), "local": drv.attr(func, "local"), "smem": shared,
                         "ctas_sm": drv.occupancy(func, warps * 32, shared), "mma": mma_cache[id(kernel)],
                         "shared_static": drv.attr(func, "shared_static"),
                         "binary_version": drv.attr(func, "binary_version"),
                         "triton_n_regs": getattr(kernel, "n_regs", None),
                         "triton_n_spills": getattr(kernel, "n_spills", None)}
            except Exception as e:  # noqa: BLE001 - one unreadable kernel must not hide the others
                errors.append(f"{name} / {fn.fn.__name__}: facts not read: {type(e).__name__}: {e}")
                print(f"  {errors[-1]}")
                continue
            gpu_rows.append({"scenario": name, "kernel": fn.fn.__name__,
                             "grid": "×".join(map(str, grid)) if not callable(grid) else "callable",
                             "tiles": tiles_of(kw), "warps": warps, "stages": stages,
                             "flags": flags_of(kw), "facts": facts})
        print(f"  {name}: {len(rec.launches)} launches ({time.time() - t0:.1f} s)")
    cpu_path = Path(args.cpu_report)
    cpu_rows = json.loads(cpu_path.read_text()) if cpu_path.is_file() else None
    if cpu_rows is None:
        lines, problems, matched = [dict(g, cpu=None, status="no CPU report") for g in gpu_rows], [], 0
        problems.append(f"no CPU report at {cpu_path} (did kernel-report-cpu fail?): nothing cross-checked")
    else:
        lines, problems, matched = compare(gpu_rows, cpu_rows)
    print(_fmt(lines))
    archs = sorted({g["facts"]["binary_version"] for g in gpu_rows})  # 90: an sm_90 cubin
    print(f"{len(gpu_rows)} launches on the GPU (cubin arch {archs}), {matched} matched with the CPU report, "
          f"{len(problems)} problem(s), {len(errors)} scenario(s) raised")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": props.name, "triton": triton.__version__,
                                               "launches": lines, "problems": problems, "errors": errors}, indent=1))
    for p in problems + errors:
        print(f"  {p}")
    if matched == 0 and not problems:
        print("compiled: nothing matched the CPU report")
        return 1
    return 1 if (problems or errors or matched == 0) else 0


def cmd_cpu_report(args) -> int:
    """Run ``kernel_report.py --only NAME --json ...`` for every scenario, in parallel: one scenario
    that fails to compile (or a Triton that lacks something) loses only its own rows."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    names = _names(args.scenarios)
    report = Path(__file__).resolve().parent / "kernel_report.py"
    out = Path(args.json)
    tmp = Path(tempfile.mkdtemp(prefix="kernel-report-"))
    jobs = args.jobs or max(1, min(len(names), os.cpu_count() or 1))
    merged: dict = {}

    def one(i_name):
        i, name = i_name
        part = tmp / f"{i}.json"
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(report), "--only", name, "--json", str(part),
                               *args.report_args.split()], capture_output=True, text=True)
        rows = json.loads(part.read_text()) if proc.returncode == 0 and part.is_file() else []
        rows = [r for r in rows if r.get("scenario") == name]  # --only is a substring match
        return name, proc, rows, time.time() - t0

    print(f"cpu-report: {len(names)} scenario(s), {jobs} at a time: {', '.join(names)}", flush=True)
    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        for name, proc, rows, dt in pool.map(one, enumerate(names)):
            merged[name] = rows
            out.write_text(json.dumps([r for n in names for r in merged.get(n, [])], indent=1))
            table = [ln for ln in proc.stdout.splitlines() if ln.startswith(name) or ln.startswith("scenario")
                     or ln.startswith("---") or "ceilings" in ln or ln.startswith("  ")]
            print(f"\n-- {name}: exit {proc.returncode}, {len(rows)} launches, {dt:.0f} s")
            print("\n".join(table))
            if proc.returncode != 0 or not rows:
                err = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("  compiled")]
                causes = list(dict.fromkeys(ln.strip() for ln in err if re.search(r"\w+(Error|Exception)\b", ln)
                                            and "above exception" not in ln and not ln.startswith("Traceback")))
                plain = [c for c in causes if "CompilationError" not in c] + [c for c in causes
                                                                               if "CompilationError" in c]
                failed.append(name)
                print(f"   FAILED: {' | '.join(plain[:3]) if plain else (err[-1] if err else 'no rows')}")
                print("\n".join(f"   | {ln}" for ln in err[-12:]))
            sys.stdout.flush()
    total = sum(len(r) for r in merged.values())
    print(f"\ncpu-report: {total} launches in {out}; {len(failed)} scenario(s) failed"
          + (f": {', '.join(failed)}" if failed else ""))
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed or not total else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compiled", help="the report's launches on the real GPU, checked against the CPU report")
    c.add_argument("--cpu-report", required=True, help="kernel_report.py --json output")
    c.add_argument("--json", help="write the GPU facts and the comparison here")
    c.add_argument("--scenarios", default="", help="comma-separated scenario names (default: all of SCENARIOS)")
    c.set_defaults(func=cmd_compiled)
    p = sub.add_parser("cpu-report", help="kernel_report.py, one process per scenario in parallel, rows merged")
    p.add_argument("--json", required=True, help="the merged rows (rewritten as each scenario finishes)")
    p.add_argument("--scenarios", default="", help="comma-separated scenario names (default: all of SCENARIOS)")
    p.add_argument("--jobs", type=int, default=0, help="parallel processes (default: one per CPU core)")
    p.add_argument("--report-args", default="", help="more arguments for kernel_report.py (split on spaces)")
    p.set_defaults(func=cmd_cpu_report)
    r = sub.add_parser("results", help="copy the bench results files, write targets.md")
    r.add_argument("--bench", required=True, help="--out folder of the main adaptkern bench run")
    r.add_argument("--graph", default=None, help="--out folder of the --cuda-graph run")
    r.add_argument("--out", required=True, help="the output folder ($OUT)")
    r.set_defaults(func=cmd_results)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Results: environment, the results file, the table, the targets of issue 5, and the plot.

Results file ``<out>/<gpu>.json`` (issue 5)::

    {"env": {"gpu", "driver", "torch", "triton", "commit", "date"},      (+ "note" off a GPU)
     "ceilings": {"bf16_tflops", "copy_gbps"},
     "rows": [{"suite", "impl", "mode", "kind", "M", "K", "N", "rank", "num_adapters",
               "activation", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb"}],
     "failures": [{"case", "error"}],          cases whose fused kernel failed its check (not timed)
     "targets": [{"target", "measured", "met"}]}   the targets of issue 5, as measured here

A run merges into an existing file of the same GPU and commit (a row replaces the row with
the same key), so the suites can be run in separate commands; a file from another commit or
GPU is replaced. Ratios and roofline fractions are not stored: they follow from the medians
and the ceilings (:func:`table_rows`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Iterable, Optional

import torch

from . import timing
from .cases import Case, work

ROW_KEYS = ("suite", "impl", "mode", "kind", "M", "K", "N", "rank", "num_adapters", "activation", "dtype",
            "median_ms", "p20_ms", "p80_ms", "peak_mem_mb")
CASE_KEYS = ("suite", "kind", "M", "K", "N", "rank", "num_adapters", "activation", "dtype")
_REPO = Path(__file__).resolve().parents[2]


# -- environment ------------------------------------------------------------------------------


def gpu_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100",
    "NVIDIA GeForce RTX 4090" -> "rtx4090", "cpu" -> "cpu"."""
    tokens = [t for t in re.split(r"[\s\-_]+", name) if t and t.upper() not in ("NVIDIA", "GEFORCE", "TESLA", "QUADRO")]
    if not tokens:
        return "gpu"
    slug = tokens[0]
    if slug.upper() in ("RTX", "GTX") and len(tokens) > 1:
        slug += tokens[1]
    return re.sub(r"[^a-z0-9]+", "", slug.lower()) or "gpu"


def _driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _commit() -> str:
    """ADAPTKERN_COMMIT if set (for copies of the tree without .git), else git's HEAD
    (+"+dirty" when tracked files differ from it), else "unknown"."""
    if os.environ.get("ADAPTKERN_COMMIT"):
        return os.environ["ADAPTKERN_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=20)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def execution_path(device: torch.device) -> str:
    """What the fused ops run on ``device``: the Triton kernels, the interpreter, or the reference."""
    from adaptkern.ops import config

    if device.type == "cuda":
        return "Triton kernels (CUDA)" + (" under the Triton interpreter" if config.interpreting() else "")
    if config.interpreting():
        return "Triton kernels in the interpreter on the CPU (TRITON_INTERPRET=1)"
    return "the PyTorch reference (adaptkern/ops/reference.py) on the CPU"


def environment(device: torch.device) -> dict:
    import triton

    if device.type == "cuda":
        gpu, driver = torch.cuda.get_device_name(device), _driver()
    else:
        gpu, driver = "cpu", None
    env = {"gpu": gpu, "driver": driver, "torch": torch.__version__, "triton": triton.__version__,
           "commit": _commit(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":  # mixed prefill sorts rows with the native op, or silently the reference
        from adaptkern.ops import alignment

        env["native_alignment"] = alignment.native_available("cuda")
        if not env["native_alignment"]:
            env["native_alignment_error"] = alignment._NATIVE_ERROR
    if device.type != "cuda":
        env["note"] = (f"no GPU: ran {execution_path(device)} on {platform.processor() or platform.machine()} "
                       "with tiny shapes as a smoke test; these timings are not GPU figures")
    return env


# -- rows and the results file ---------------------------------------------------------------


def make_row(case: Case, impl: str, mode: str, t: "timing.Timing") -> dict:
    row = {"impl": impl, "mode": mode, **case.fields(), "median_ms": t.median_ms, "p20_ms": t.p20_ms,
           "p80_ms": t.p80_ms, "peak_mem_mb": t.peak_mem_mb}
    return {k: row[k] for k in ROW_KEYS}


def _row_key(row: dict) -> tuple:
    return tuple(row[k] for k in ROW_KEYS[:11])


def _case_of(row: dict) -> Case:
    return Case(**{k: row[k] for k in CASE_KEYS})


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def merge(old: Optional[dict], new: dict) -> tuple[dict, str]:
    """Merge ``new`` into ``old`` when both come from the same GPU, commit and method
    (``env.note``); else ``new``."""
    same = old and all(old.get("env", {}).get(k) == new["env"].get(k) for k in ("gpu", "commit", "note"))
    if not same or new["env"]["commit"] == "unknown":
        return new, "new file" if not old else "replaced (another GPU, commit or method)"
    new_cases = {f["case"] for f in new.get("failures", [])}
    rows = {_row_key(r): r for r in old.get("rows", [])
            if not (r["impl"] == "fused" and _case_of(r).id in new_cases)}
    rows.update({_row_key(r): r for r in new["rows"]})
    timed = {_case_of(r).id for r in new["rows"]}
    failures = [f for f in old.get("failures", []) if f["case"] not in new_cases | timed] + new.get("failures", [])
    kept = len(rows) - len(new["rows"])
    out = dict(new, rows=list(rows.values()), failures=failures)
    return out, f"merged with {kept} earlier rows of the same GPU and commit"


def write_results(out_dir, env: dict, ceilings: dict, rows: list, failures: list, log, suffix: str = "") -> Path:
    """Write ``<out_dir>/<gpu><suffix>.json`` (merging, see the module docstring); returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{gpu_slug(env['gpu'])}{suffix}.json"
    new = {"env": env, "ceilings": ceilings, "rows": rows, "failures": failures}
    old = None
    if path.exists():
        try:
            old = load(path)
        except (OSError, ValueError):
            old = None
    data, how = merge(old, new)
    data["targets"] = evaluate_targets(data)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    log(f"wrote {path} ({len(data['rows'])} rows; {how})")
    return path


# -- ratios, the table -----------------------------------------------------------------------


def _index(rows: Iterable[dict]) -> dict:
    """{(case, mode): {impl: row}}."""
    out: dict = {}
    for r in rows:
        out.setdefault((_case_of(r), r["mode"]), {})[r["impl"]] = r
    return out


def _ms(row: Optional[dict]) -> Optional[float]:
    return None if row is None else row.get("median_ms")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def table_rows(data: dict) -> list[dict]:
    """One dict per (case, mode): the medians and the ratios of the fused op."""
    failed = {f["case"]: f["error"] for f in data.get("failures", [])}
    out = []
    for (case, mode), impls in _index(data["rows"]).items():
        fused = _ms(impls.get("fused"))
        flops, nbytes = work(case, mode)
        out.append({
            "case": case.id, "suite": case.suite, "mode": mode,
            **{impl: _ms(impls.get(impl)) for impl in ("fused", "eager", "peft", "compiled_eager", "base_linear")},
            "vs_eager": _ratio(_ms(impls.get("eager")), fused),
            "vs_peft": _ratio(_ms(impls.get("peft")), fused),
            "vs_compiled": _ratio(_ms(impls.get("compiled_eager")), fused),
            "over_base": _ratio(fused, _ms(impls.get("base_linear"))),
            "roofline": timing.roofline_fraction(flops, nbytes, fused, data.get("ceilings")),
            "fused_mem": (impls.get("fused") or {}).get("peak_mem_mb"),
            "eager_mem": (impls.get("eager") or {}).get("peak_mem_mb"),
            "failed": failed.get(case.id),
        })
    return out


_COLUMNS = [("case", "case", None), ("mode", "mode", None), ("fused", "fused ms", "ms"), ("eager", "eager ms", "ms"),
            ("peft", "peft ms", "ms"), ("compiled_eager", "compiled ms", "ms"), ("base_linear", "F.linear ms", "ms"),
            ("vs_eager", "eager/fused", "x"), ("vs_peft", "peft/fused", "x"), ("vs_compiled", "compiled/fused", "x"),
            ("over_base", "fused/F.linear", "x"), ("roofline", "roofline", "pct"), ("fused_mem", "fused MiB", "mb"),
            ("eager_mem", "eager MiB", "mb")]


def _fmt(v, kind) -> str:
    if v is None:
        return "-"
    if kind == "ms":
        return f"{v:.4f}" if v < 1 else f"{v:.3f}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "pct":
        return f"{100 * v:.0f}%"
    if kind == "mb":
        return f"{v:.0f}"
    return str(v)


def _cells(tr: dict) -> list[str]:
    cells = [_fmt(tr[key], kind) for key, _, kind in _COLUMNS]
    if tr["failed"]:
        cells[2] = "FAILED"
    return cells


def format_table(data: dict) -> str:
    """Plain-text table (one line per case and mode) with the ratios of the fused op."""
    trs = table_rows(data)
    if not trs:
        return "(no rows)"
    head = [title for _, title, _ in _COLUMNS]
    body = [_cells(tr) for tr in trs]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    legend = ("eager/fused, peft/fused, compiled/fused: speed-up of fused (>1 is faster); fused/F.linear: "
              "overhead over the frozen layer alone (1.00x is free); roofline: max(flops/matmul rate, "
              "bytes/copy bandwidth) / fused time; MiB: peak memory above the resident inputs")
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body] + [legend])


def format_markdown(data: dict) -> str:
    """The same table in Markdown (for the README), with the environment and the targets."""
    env, ceil = data["env"], data.get("ceilings", {})
    out = [f"**{env['gpu']}** — torch {env['torch']}, triton {env['triton']}, driver {env.get('driver') or 'n/a'}, "
           f"commit `{str(env['commit'])[:12]}`, {env['date']}. Measured ceilings: "
           f"{ceil.get('bf16_tflops', 0):.3g} bf16 TFLOP/s, {ceil.get('copy_gbps', 0):.3g} GB/s copy."]
    if env.get("note"):
        out.append(f"\n> {env['note']}")
    out.append("")
    out.append("| " + " | ".join(title for _, title, _ in _COLUMNS) + " |")
    out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(_COLUMNS))) + "|")
    for tr in table_rows(data):
        out.append("| " + " | ".join(_cells(tr)) + " |")
    targets = data.get("targets") or evaluate_targets(data)
    if targets:
        out += ["", "| target (issue 5) | measured | met |", "|---|---|---|"]
        for t in targets:
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            out.append(f"| {t['target']} | {t['measured'] or '-'} | {met} |")
    return "\n".join(out) + "\n"


# -- targets (issue 5) -----------------------------------------------------------------------


def evaluate_targets(data: dict) -> list[dict]:
    """The targets of issue 5 against these rows: {"target", "measured", "met"} (met None:
    a row it needs is missing)."""
    idx = _index(data["rows"])
    ceil = data.get("ceilings") or {}

    def ms(suite, kind, m, k, n, r, mode, impl, s=1, act=None):
        case = Case(suite, kind, m, k, n, r, s, act or ("identity" if kind == "lora" else "gelu"))
        return _ms(idx.get((case, mode), {}).get(impl))

    out = []

    def ratio_target(text, num, den, op, bound, what):
        if not num or not den:
            out.append({"target": text, "measured": None, "met": None})
            return
        v = num / den
        met = v >= bound if op == ">=" else v <= bound
        out.append({"target": text, "measured": f"{v:.2f}x {what}", "met": bool(met)})

    lora = ("core", "lora", 8192, 4096, 4096, 16)
    seq = ("core", "bottleneck_sequential", 8192, 4096, 4096, 256)
    ratio_target("LoRA r=16, M=8192, K=N=4096, fwd+bwd: >= 1.45x faster than eager",
                 ms(*lora, "forward_backward", "eager"), ms(*lora, "forward_backward", "fused"), ">=", 1.45,
                 "eager/fused")
    ratio_target("LoRA r=16, M=8192, K=N=4096, fwd+bwd: >= 1.3x faster than peft",
                 ms(*lora, "forward_backward", "peft"), ms(*lora, "forward_backward", "fused"), ">=", 1.3, "peft/fused")
    ratio_target("LoRA r=16, M=8192, K=N=4096, forward: <= 1.08x F.linear alone",
                 ms(*lora, "forward", "fused"), ms(*lora, "forward", "base_linear"), "<=", 1.08, "fused/F.linear")
    ratio_target("sequential bottleneck R=256 GELU, M=8192, K=N=4096, fwd+bwd: >= 1.6x faster than eager",
                 ms(*seq, "forward_backward", "eager"), ms(*seq, "forward_backward", "fused"), ">=", 1.6, "eager/fused")
    dec = ("mixed", "lora", 64, 4096, 4096, 16, "forward")
    ratio_target("mixed decode M=64, 32 adapters r=16: <= 1.15x F.linear alone",
                 ms(*dec, "fused", 32), ms(*dec, "base_linear", 32), "<=", 1.15, "fused/F.linear")
    ratio_target("mixed decode M=64, 32 adapters r=16: >= 5x faster than the eager loop",
                 ms(*dec, "eager", 32), ms(*dec, "fused", 32), ">=", 5.0, "eager/fused")
    pre = ("mixed", "lora", 8192, 4096, 4096, 16, "forward")
    ratio_target("mixed prefill M=8192, 8 adapters r=16: >= 2x faster than the eager loop",
                 ms(*pre, "eager", 8), ms(*pre, "fused", 8), ">=", 2.0, "eager/fused")
    d256 = ("mixed", "lora", 256, 4096, 4096, 16, "forward", "fused")
    ratio_target("decode M=256 r=16: 128 distinct adapters <= 10% slower than 1",
                 ms(*d256, 128), ms(*d256, 1), "<=", 1.10, "128/1 adapters")

    def fraction_target(text, pick, kind, bound):
        fr = []
        for (case, mode), impls in idx.items():
            if pick(case) and _ms(impls.get("fused")):
                flops, nbytes = work(case, mode)
                t = _ms(impls["fused"]) * 1e-3
                key, scale = ("bf16_tflops", 1e12) if kind == "flops" else ("copy_gbps", 1e9)
                if ceil.get(key):
                    fr.append(((flops if kind == "flops" else nbytes) / t / (ceil[key] * scale), f"{case.id} {mode}"))
        if not fr:
            out.append({"target": text, "measured": None, "met": None})
            return
        worst = min(fr)
        met = sum(v >= bound for v, _ in fr)
        out.append({"target": text, "measured": f"{met}/{len(fr)} cases; worst {100 * worst[0]:.0f}% ({worst[1]})",
                    "met": met == len(fr)})

    fraction_target("large-M fused cases (M >= 2048): >= 75% of the measured bf16 matmul rate",
                    lambda c: c.M >= 2048 and c.K >= 4096 and c.dtype == "bfloat16", "flops", 0.75)
    fraction_target("decode fused cases (mixed, M <= 256): >= 80% of the measured copy bandwidth",
                    lambda c: c.suite == "mixed" and c.M <= 256 and c.K >= 4096, "bytes", 0.80)

    mem = [(case, impls) for (case, mode), impls in idx.items() if mode == "forward_backward"
           and (impls.get("fused") or {}).get("peak_mem_mb") is not None
           and (impls.get("eager") or {}).get("peak_mem_mb") is not None]
    text = "memory, fwd+bwd: fused peak at or below eager's"
    if not mem:
        out.append({"target": text, "measured": None, "met": None})
    else:
        over = [(i["fused"]["peak_mem_mb"] / max(i["eager"]["peak_mem_mb"], 1e-9), c.id) for c, i in mem]
        met = sum(v <= 1.0 for v, _ in over)
        worst = max(over)
        out.append({"target": text, "met": met == len(over),
                    "measured": f"{met}/{len(over)} cases; worst fused/eager {worst[0]:.2f} ({worst[1]})"})
    return out


def format_targets(targets: list[dict]) -> str:
    lines = ["targets (issue 5):"]
    for t in targets:
        met = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        lines.append(f"  [{met:>12}] {t['target']}" + (f": {t['measured']}" if t["measured"] else ""))
    return "\n".join(lines)


# -- plot --------------------------------------------------------------------------------------


def plot(data: dict, path, log) -> Optional[Path]:
    """Bar chart of every impl's time relative to the frozen F.linear (1.0 = free adapter),
    one panel per suite and mode. Skipped, with a message, when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        log(f"plot skipped: matplotlib is not importable ({type(e).__name__}); `pip install matplotlib`, "
            "then `python benchmarks/plot.py` redraws it from the results file")
        return None
    idx = _index(data["rows"])
    panels: dict = {}
    for (case, mode), impls in idx.items():
        base = _ms(impls.get("base_linear"))
        if base:
            panels.setdefault((case.suite, mode), []).append((case, impls, base))
    if not panels:
        log("plot skipped: no rows with an F.linear baseline")
        return None
    impls_order = ["fused", "eager", "peft", "compiled_eager"]
    colors = {"fused": "tab:green", "eager": "tab:red", "peft": "tab:orange", "compiled_eager": "tab:blue"}
    keys = sorted(panels)
    heights = [max(2.5, 0.32 * len(panels[k]) * len(impls_order) / 2 + 1.2) for k in keys]
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, key in zip(axes[:, 0], keys):
        entries = panels[key]
        present = [i for i in impls_order if any(_ms(e[1].get(i)) for e in entries)]
        width = 0.8 / max(len(present), 1)
        ratios = []
        for j, impl in enumerate(present):
            pts = [(i + j * width, _ms(e[1].get(impl)) / e[2]) for i, e in enumerate(entries) if _ms(e[1].get(impl))]
            ax.barh([y for y, _ in pts], [v for _, v in pts], height=width, color=colors[impl], label=impl)
            ratios += [v for _, v in pts]
        ax.axvline(1.0, color="black", lw=1, ls="--", label="F.linear alone")
        if ratios and max(ratios) / min(ratios + [1.0]) > 20:
            ax.set_xscale("log")
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(entries))])
        ax.set_yticklabels([e[0].id for e in entries], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("time / frozen F.linear time (lower is better)")
        ax.set_title(f"{key[0]} suite, {key[1]}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    env = data["env"]
    fig.suptitle(f"adaptkern on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, "
                 f"{str(env['commit'])[:10]}, {env['date'][:10]})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")
    return path

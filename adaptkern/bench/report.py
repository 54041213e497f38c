"""The results file and the tables printed from it.

Results file (``<out>/<gpu>.json``; ``<gpu>-cudagraph.json`` for ``--cuda-graph``), written
whole by every run (files are never merged)::

    {"env": {"gpu", "device", "driver", "cuda", "adaptkern", "python", "torch", "triton",
             "transformers", "peft", "safetensors", "fused_ops_run", "commit", "timestamp",
             "method"},
     "ceilings": {"bf16_tflops", "copy_gbps"} | null,   measured in the same run; GPU only
     "rows": [{"suite", "kind", "M", "K", "N", "rank", "num_adapters", "activation", "dtype",
               "variant", "impl", "mode", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb"}],
     "failures": [{"case", "error"}]}                   fused ops that failed their check (not timed)

Ratios and roofline fractions are not stored: they follow from the medians and the ceilings,
and are printed for GPU runs only (on a CPU they mean nothing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from . import timing
from .cases import Case, work
from ..ops.config import gpu_slug

CASE_KEYS = ("suite", "kind", "M", "K", "N", "rank", "num_adapters", "activation", "dtype", "variant")
ROW_KEYS = CASE_KEYS + ("impl", "mode", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb")
IMPL_TITLES = {"fused": "fused", "eager": "eager", "peft": "peft", "fuse_peft": "peft+fuse",
               "compiled_eager": "compiled", "dequant": "dequant", "lora": "LoRA", "vllm": "vllm", "delta": "delta",
               "two_launch": "2-launch", "graph_replay": "graph", "base_linear": "F.linear"}
# the impls each ratio column divides by fused
BASELINES = ("eager", "peft", "fuse_peft", "compiled_eager", "dequant", "lora", "vllm", "delta", "two_launch",
             "graph_replay")
MEMORY = ("fused", "eager", "peft", "dequant")  # the impls whose peak memory gets a column
CPU_CAVEAT = "CPU smoke test, not a measurement"
NOISY_MARK = "~"

LEGEND = (
    "case id: <kind>-M<rows>-K<in>-N<out>-r<rank>[-<activation>][-<variant>][-S<adapters>]-<dtype>\n"
    "fused: adaptkern's op; eager: the same math as plain PyTorch ops (the ops' reference.py, PEFT's and "
    "AdapterHub's op order); peft: the real peft layer (LoRA, QLoRA on bitsandbytes, DoRA); compiled: torch.compile "
    "of eager; F.linear: the frozen layer alone\n"
    "dequant: bitsandbytes dequantize then eager LoRA; LoRA: adaptkern's LoRA at DoRA's shape; vllm: vLLM's PyTorch "
    "LoRA ops; delta: F.linear + add_lora_delta; 2-launch: lora_shrink + lora_expand; graph: CUDA-graph replay with "
    "a refilled SlotMapping\n"
    f"times: median ms; '{NOISY_MARK}' marks a spread p80/p20 > {timing.NOISY_SPREAD} (noisy)")
GPU_LEGEND = (
    "x/fused: speed-up of fused (>1: fused is faster); fused/F.linear: cost over the frozen layer (1.00x: free)\n"
    "ceilings (measured in this run): bf16 matmul {bf16_tflops:.3g} TFLOP/s, copy {copy_gbps:.3g} GB/s; roofline = "
    "max(flops / matmul rate, bytes / copy bandwidth) / fused time; MiB: peak memory above the resident inputs")
MORE = "method and definitions: benchmarks/README.md"


def make_row(case: Case, impl: str, mode: str, t: timing.Timing) -> dict:
    row = {**case.fields(), "impl": impl, "mode": mode, "median_ms": t.median_ms, "p20_ms": t.p20_ms,
           "p80_ms": t.p80_ms, "peak_mem_mb": t.peak_mem_mb}
    return {k: row[k] for k in ROW_KEYS}


def results_path(out_dir, env: dict, graph: bool = False) -> Path:
    return Path(out_dir) / f"{gpu_slug(env['gpu'])}{'-cudagraph' if graph else ''}.json"


def write(path, data: dict) -> Path:
    """Write ``data`` to ``path`` atomically (replacing any earlier file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load(path) -> dict:
    return json.loads(Path(path).read_text())


def on_gpu(data: dict) -> bool:
    return data["env"].get("device") == "cuda"


# -- the table -----------------------------------------------------------------------------------


def _case(row: dict) -> Case:
    return Case(**{k: row[k] for k in CASE_KEYS if k in row})  # files written before "variant" lack it


def table_rows(data: dict) -> list[dict]:
    """One dict per (case, mode): each impl's row, the fused op's ratios (GPU only), failure."""
    failed = {f["case"]: f["error"] for f in data.get("failures", [])}
    grouped: dict = {}  # (case id, mode) -> (Case or None, {impl: row})
    for r in data["rows"]:
        case = _case(r)
        grouped.setdefault((case.id, r["mode"]), (case, {}))[1][r["impl"]] = r
    for cid in failed:  # a failed case with no timed row still gets a line
        if not any(key[0] == cid for key in grouped):
            grouped[(cid, "-")] = (None, {})
    out = []
    for (cid, mode), (case, impls) in grouped.items():
        tr = {"case": cid, "mode": mode, "impls": impls, "failed": failed.get(cid)}
        ms = {i: r["median_ms"] for i, r in impls.items()}
        if on_gpu(data) and case is not None and "fused" in ms:
            fused = ms["fused"]
            tr.update({f"{i}/fused": ms[i] / fused for i in BASELINES if i in ms})
            if "base_linear" in ms:
                tr["fused/F.linear"] = fused / ms["base_linear"]
            tr["roofline"] = timing.roofline_fraction(*work(case, mode), fused, data.get("ceilings"))
        out.append(tr)
    return out


def _ms(row: Optional[dict]) -> str:
    if row is None:
        return "-"
    v = row["median_ms"]
    noisy = timing.Timing(v, row["p20_ms"], row["p80_ms"]).noisy
    return (f"{v:.4f}" if v < 1 else f"{v:.3f}") + (NOISY_MARK if noisy else "")


def _columns(data: dict, trs: list[dict]) -> list[tuple[str, object]]:
    """(title, cell function of a table row) for every column of this run."""
    present = [i for i in IMPL_TITLES if any(i in tr["impls"] or (i == "fused" and tr["failed"]) for tr in trs)]
    cols = [("case", lambda tr: tr["case"]), ("mode", lambda tr: tr["mode"])]
    cols += [(f"{IMPL_TITLES[i]} ms", lambda tr, i=i: "FAILED" if i == "fused" and tr["failed"]
              else _ms(tr["impls"].get(i))) for i in present]
    if not on_gpu(data):
        return cols
    ratio = lambda key: lambda tr: "-" if tr.get(key) is None else f"{tr[key]:.2f}x"  # noqa: E731
    cols += [(f"{IMPL_TITLES[i]}/fused", ratio(f"{i}/fused")) for i in BASELINES
             if i in present]
    cols += [("fused/F.linear", ratio("fused/F.linear")),
             ("roofline", lambda tr: "-" if tr.get("roofline") is None else f"{100 * tr['roofline']:.0f}%")]
    mem = lambda i: lambda tr: "-" if (tr["impls"].get(i) or {}).get("peak_mem_mb") is None \
        else f"{tr['impls'][i]['peak_mem_mb']:.0f}"  # noqa: E731
    return cols + [(f"{IMPL_TITLES[i]} MiB", mem(i)) for i in MEMORY if i in present]


def header(data: dict) -> list[str]:
    """Lines that say what ran where, and what the columns mean."""
    env = data["env"]
    where = (f"adaptkern bench on {env['gpu']}: fused ops ran {env.get('fused_ops_run')}; torch {env.get('torch')}, "
             f"triton {env.get('triton')}, commit {(env.get('commit') or 'unknown')[:12]}, {env.get('timestamp')}; "
             f"timed with {env.get('method')}")
    lines = [where]
    if not on_gpu(data):
        lines.append(f"{CPU_CAVEAT}: tiny shapes on a CPU; the times only show that every implementation runs. "
                     "No ratios, roofline or memory here: they mean nothing off a GPU.")
    if env.get("note"):
        lines.append(f"NOTE: {env['note']}")
    lines += LEGEND.splitlines()
    if on_gpu(data) and data.get("ceilings"):
        lines += GPU_LEGEND.format(**data["ceilings"]).splitlines()
    return lines + [MORE]


def format_table(data: dict) -> str:
    """The plain-text report: the header, then one line per case and mode."""
    trs = table_rows(data)
    cols = _columns(data, trs)
    body = [[cell(tr) for _, cell in cols] for tr in trs]
    head = [title for title, _ in cols]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    table = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body] if body else ["(no rows)"]
    if not on_gpu(data):
        table.append(f"({CPU_CAVEAT})")
    return "\n".join(header(data) + [""] + table)


def format_markdown(data: dict) -> str:
    """The same report in Markdown (for the README)."""
    trs = table_rows(data)
    cols = _columns(data, trs)
    first, *rest = header(data)
    rest = [h.replace("<", "\\<") for h in rest]  # case-id placeholders, not HTML tags
    out = [first, ""] + [f"- {'**' + h + '**' if h.startswith(CPU_CAVEAT) else h}" for h in rest] + [""]
    out.append("| " + " | ".join(title for title, _ in cols) + " |")
    out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|")
    out += ["| " + " | ".join(cell(tr) for _, cell in cols) + " |" for tr in trs]
    return "\n".join(out) + "\n"

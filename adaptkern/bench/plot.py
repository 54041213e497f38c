"""The plot of a results file: one horizontal bar per implementation and case, one panel per
suite and mode, error bars from p20 to p80.

On a GPU each bar is the time relative to the frozen ``F.linear`` of the same case (1.0: the
adapter is free). On a CPU the bars are plain milliseconds under the caption "CPU smoke test,
not a measurement" (ratios there mean nothing). Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from .report import CPU_CAVEAT, IMPL_TITLES, on_gpu, table_rows

COLORS = {"fused": "tab:green", "eager": "tab:red", "peft": "tab:orange", "fuse_peft": "tab:purple",
          "compiled_eager": "tab:blue", "dequant": "tab:brown", "lora": "tab:olive", "vllm": "tab:pink",
          "delta": "tab:cyan", "two_launch": "gold", "graph_replay": "darkgreen", "base_linear": "tab:gray"}


def _bars(data: dict) -> dict:
    """{(suite, mode): [(case id, {impl: (value, low error, high error)})]} in plot units."""
    gpu = on_gpu(data)
    panels: dict = {}
    for tr in table_rows(data):
        rows = tr["impls"]
        if not rows:
            continue
        unit = rows["base_linear"]["median_ms"] if gpu and "base_linear" in rows else (None if gpu else 1.0)
        if unit is None:
            continue
        shown = {i: r for i, r in rows.items() if not (gpu and i == "base_linear")}
        bars = {i: (r["median_ms"] / unit, (r["median_ms"] - r["p20_ms"]) / unit, (r["p80_ms"] - r["median_ms"]) / unit)
                for i, r in shown.items()}
        suite = next(iter(rows.values()))["suite"]
        panels.setdefault((suite, tr["mode"]), []).append((tr["case"], bars))
    return panels


def plot(data: dict, path, log: Callable[[str], None] = print) -> Optional[Path]:
    """Draw ``data`` (a results file's content) to ``path``; None, with a message, when
    matplotlib is absent or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001 - any import failure means "no plot"
        log(f"plot skipped: matplotlib is not importable ({type(e).__name__}); install the bench extra "
            "(pip install -e '.[bench]'), then `python benchmarks/plot.py <results>.json` redraws it")
        return None
    panels = _bars(data)
    if not panels:
        log("plot skipped: no rows to draw" + (" (a GPU plot needs the F.linear rows)" if on_gpu(data) else ""))
        return None
    gpu = on_gpu(data)
    keys = sorted(panels)
    heights = [max(2.5, 0.25 * sum(len(b) for _, b in panels[k]) + 1.2) for k in keys]
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, key in zip(axes[:, 0], keys):
        entries = panels[key]
        impls = [i for i in IMPL_TITLES if any(i in bars for _, bars in entries)]
        width = 0.8 / len(impls)
        values = []
        for j, impl in enumerate(impls):
            pts = [(n + j * width, *bars[impl]) for n, (_, bars) in enumerate(entries) if impl in bars]
            ax.barh([p[0] for p in pts], [p[1] for p in pts], height=width, color=COLORS[impl],
                    xerr=[[p[2] for p in pts], [p[3] for p in pts]], error_kw={"elinewidth": 0.8, "capsize": 2},
                    label=IMPL_TITLES[impl])
            values += [p[1] for p in pts]
        if gpu:
            ax.axvline(1.0, color="black", lw=1, ls="--", label="F.linear alone")
        if values and max(values) / max(min(values), 1e-12) > 20:
            ax.set_xscale("log")
        ax.set_yticks([n + 0.4 - width / 2 for n in range(len(entries))])
        ax.set_yticklabels([cid for cid, _ in entries], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("time / frozen F.linear time (lower is better)" if gpu
                      else f"ms per call ({CPU_CAVEAT})")
        ax.set_title(f"{key[0]} suite, {key[1]}" + ("" if gpu else f" — {CPU_CAVEAT}"), fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    env = data["env"]
    title = (f"adaptkern on {env['gpu']} (torch {env.get('torch')}, triton {env.get('triton')}, "
             f"{(env.get('commit') or 'unknown commit')[:10]}, {str(env.get('timestamp'))[:10]}); bars: median, "
             "whiskers: p20-p80")
    fig.suptitle(title if gpu else f"{CPU_CAVEAT.upper()}\n{title}", fontsize=10, color="black" if gpu else "darkred")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")
    return path

"""Redraw the plot and the Markdown table of results files written by ``adaptkern bench``.

    python benchmarks/plot.py [FILE.json ...]        # default: every benchmarks/results/*.json

For each file this writes ``<file>.png`` (needs matplotlib) and ``<file>.md`` (the table for
the README) beside it, and prints the Markdown. Nothing is measured here, and files are never
merged: run each suite with its own ``--out`` folder and plot each file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from adaptkern.bench import report  # noqa: E402
from adaptkern.bench.plot import plot  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/plot.py", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="results files (default: benchmarks/results/*.json)")
    p.add_argument("--no-plot", action="store_true", help="write the Markdown tables only")
    args = p.parse_args(argv)
    files = args.files or sorted((HERE / "results").glob("*.json"))
    if not files:
        p.error(f"no results files given and none in {HERE / 'results'}; run `adaptkern bench --out DIR` first")
    for path in files:
        data = report.load(path)
        md = report.format_markdown(data)
        path.with_suffix(".md").write_text(md)
        print(f"## {path.stem}\n\n{md}")
        print(f"wrote {path.with_suffix('.md')}", file=sys.stderr)
        if not args.no_plot:
            plot(data, path.with_suffix(".png"), lambda s: print(s, file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main())

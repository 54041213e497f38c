"""Redraw the plots and tables of the README from the committed results files.

    python benchmarks/plot.py [--results benchmarks/results]
    python benchmarks/plot.py --merge part1/h100.json part2/h100.json   # into results/h100.json

For every ``<gpu>.json`` in the results folder (written by ``adaptkern bench --out``) this
writes ``<gpu>.png`` (every impl's time relative to the frozen F.linear, per suite and
mode; needs matplotlib) and ``<gpu>.md`` (the table with ratios, roofline fractions and the
targets of issue 5, in Markdown), and prints the Markdown. Nothing is measured here.

``--merge`` first combines results files written by separate ``adaptkern bench`` commands
(e.g. core and mixed suites run as two commands on the GPU) into ``<results>/<name>.json``;
they must come from the same GPU, commit and method (set ADAPTKERN_COMMIT where the tree
has no .git), unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from adaptkern.bench import report  # noqa: E402


def merge_into(files, results: Path, force: bool) -> int:
    """Merge ``files`` (same file name) into ``results/<name>.json``; returns 1 on refusal."""
    names = {Path(f).name for f in files}
    if len(names) != 1:
        print(f"--merge takes files of one GPU and method (one file name), got {sorted(names)}", file=sys.stderr)
        return 1
    merged = None
    for f in files:
        data = report.load(f)
        if merged is None:
            merged = data
            continue
        out, how = report.merge(merged, data)
        if how.startswith("replaced"):
            if not force:
                print(f"refusing to merge {f}: {how} (env {data['env']} vs {merged['env']}); --force to merge",
                      file=sys.stderr)
                return 1
            old = {report._row_key(r): r for r in merged["rows"]}
            old.update({report._row_key(r): r for r in data["rows"]})
            out = dict(data, rows=list(old.values()),
                       failures=merged.get("failures", []) + data.get("failures", []))
        merged = out
    merged["targets"] = report.evaluate_targets(merged)
    results.mkdir(parents=True, exist_ok=True)
    dest = results / names.pop()
    dest.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {dest} ({len(merged['rows'])} rows from {len(files)} files)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(HERE / "results"), help="folder of <gpu>.json files")
    p.add_argument("--no-plot", action="store_true", help="write the Markdown tables only")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="results files to merge into the results folder first")
    p.add_argument("--force", action="store_true", help="with --merge: merge even across commits (later files win)")
    args = p.parse_args(argv)
    if args.merge and merge_into(args.merge, Path(args.results), args.force):
        return 1
    files = sorted(Path(args.results).glob("*.json"))
    if not files:
        print(f"no results files in {args.results}; run `adaptkern bench --out {args.results}` on a GPU first",
              file=sys.stderr)
        return 1
    for path in files:
        data = report.load(path)
        if "targets" not in data:
            data["targets"] = report.evaluate_targets(data)
        md = report.format_markdown(data)
        path.with_suffix(".md").write_text(md)
        print(f"## {path.stem}\n\n{md}")
        print(f"wrote {path.with_suffix('.md')}", file=sys.stderr)
        if not args.no_plot:
            report.plot(data, path.with_suffix(".png"), lambda s: print(s, file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main())

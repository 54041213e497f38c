"""The per-GPU launch-config table that ``benchmarks/tune.py`` writes: its schema, the check
that what is written matches it, and the file format (one line per M entry, readable diffs).

The library reads these tables (``adaptkern/ops/config.py``); the schema is checked here, by
the writer, so a table that reaches the library was valid when it was written.

Schema, version 1 (``adaptkern/ops/configs/README.md`` shows an example)::

    {"version": 1, "elem": <bytes per dot operand: 2, 4 or 8>, "env": {...},
     "<kernel>": {"<shape key>": {"<M>": {<launch fields>, <informational fields>}}}}

* kernels: ``gemm`` (shape key ``N=<n>``), ``onepass`` and ``route`` (``N=<n>,R=<r>``),
  ``mixed`` (``K=<k>,R=<r>``); n, k: the size's power-of-two bucket; r: the padded rank tile
  (a power of two >= 16); route tables hold R <= 64 only.
* launch fields: see ``FIELDS`` (required) and ``OPTIONAL``, bounded by ``BOUNDS``; block
  sizes and warps are powers of two. ``route`` entries hold ``route``: "onepass" or "split".
* informational fields (``INFO``): what the tuner measured.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

VERSION = 1
KERNELS = ("gemm", "onepass", "mixed", "route")
ROUTES = ("onepass", "split")
SHAPE_KEYS = {"gemm": ("N",), "onepass": ("N", "R"), "mixed": ("K", "R"), "route": ("N", "R")}
_TILE = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
FIELDS = {"gemm": _TILE + ("group_m",), "onepass": _TILE + ("group_m",), "mixed": _TILE, "route": ("route",)}
OPTIONAL = {"mixed": ("split",)}
INFO = ("ms", "heuristic_ms", "onepass_ms", "split_ms", "candidates", "heuristic")
# With every block <= 256 and BLOCK_K >= 16, the library's shared-memory fit can always
# reach its budget; tl.dot needs every block >= 16.
BOUNDS = {"block_m": (16, 256), "block_n": (16, 256), "block_k": (16, 256), "group_m": (1, 64),
          "num_warps": (1, 16), "num_stages": (1, 8), "split": (1, 16)}
POW2 = ("block_m", "block_n", "block_k", "num_warps")
ROUTE_MAX_R = 64


def launch_fields(kernel: str) -> tuple[str, ...]:
    """The launch parameters an entry of ``kernel`` holds (required, then optional)."""
    return FIELDS[kernel] + OPTIONAL.get(kernel, ())


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _check_entry(kernel: str, entry, fail) -> None:
    if not isinstance(entry, dict):
        fail(f"entry must be an object, got {type(entry).__name__}")
    unknown = set(entry) - set(launch_fields(kernel)) - set(INFO)
    if unknown:
        fail(f"unknown field(s) {sorted(unknown)}; {kernel} entries hold {', '.join(launch_fields(kernel))}")
    missing = [f for f in FIELDS[kernel] if f not in entry]
    if missing:
        fail(f"missing {', '.join(missing)}")
    for name in launch_fields(kernel):
        if name not in entry:
            continue
        v = entry[name]
        if name == "route":
            if v not in ROUTES:
                fail(f"route must be one of {ROUTES}, got {v!r}")
            continue
        lo, hi = BOUNDS[name]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            fail(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        if name in POW2 and not _pow2(v):
            fail(f"{name} must be a power of two, got {v}")


def _check_shape(kernel: str, key, fail) -> None:
    names = SHAPE_KEYS[kernel]
    match = re.fullmatch(",".join(rf"{n}=(\d+)" for n in names), key) if isinstance(key, str) else None
    if match is None:
        fail(f"shape key must look like {','.join(f'{n}=4096' for n in names)!r}")
    for name, v in zip(names, map(int, match.groups())):
        if not _pow2(v) or (name == "R" and v < 16):
            fail(f"{name}={v} is not a bucket (a power of two{', >= 16' if name == 'R' else ''})")
        if kernel == "route" and name == "R" and v > ROUTE_MAX_R:
            fail(f"R={v}: ranks above {ROUTE_MAX_R} always take the split route")


def validate(data, source: str = "<table>") -> None:
    """Raise ``ValueError`` naming ``source`` and the field at fault when ``data`` (parsed
    JSON) does not follow the schema."""

    def fail_at(where):
        def fail(msg):
            raise ValueError(f"config table {source}: {where}: {msg}")
        return fail

    if not isinstance(data, dict):
        fail_at("top level")(f"must be an object, got {type(data).__name__}")
    for name in data:
        if name not in ("version", "elem", "env") + KERNELS:
            fail_at(name)("unknown top-level field")
    if data.get("version") != VERSION:
        fail_at("version")(f"must be {VERSION}, got {data.get('version')!r}")
    if data.get("elem") not in (2, 4, 8) or isinstance(data.get("elem"), bool):
        fail_at("elem")(f"must be the dot operand size in bytes (2, 4 or 8), got {data.get('elem')!r}")
    if not isinstance(data.get("env", {}), dict):
        fail_at("env")("must be an object")
    for kernel in KERNELS:
        shapes = data.get(kernel, {})
        if not isinstance(shapes, dict):
            fail_at(kernel)("must be an object keyed by shape")
        for key, by_m in shapes.items():
            _check_shape(kernel, key, fail_at(f"{kernel}[{key!r}]"))
            if not isinstance(by_m, dict) or not by_m:
                fail_at(f"{kernel}[{key!r}]")("must be a non-empty object keyed by M")
            for m, entry in by_m.items():
                where = f"{kernel}[{key!r}][{m!r}]"
                if not (isinstance(m, str) and m.isdigit() and int(m) >= 1):
                    fail_at(where)("M keys must be positive integers written as strings")
                _check_entry(kernel, entry, fail_at(where))


def format_table(data: dict) -> str:
    """JSON with one line per M entry (readable diffs)."""
    top = [(k, data[k]) for k in ("version", "elem", "env") if k in data]
    sections = [(k, data[k]) for k in KERNELS if data.get(k)]
    lines = ["{"]
    for i, (k, v) in enumerate(top + sections):
        comma = "," if i < len(top) + len(sections) - 1 else ""
        if k not in KERNELS:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}{comma}")
            continue
        lines.append(f" {json.dumps(k)}: {{")
        shapes = sorted(v.items(), key=lambda kv: [int(p.split("=")[1]) for p in kv[0].split(",")])
        for j, (shape, by_m) in enumerate(shapes):
            lines.append(f"  {json.dumps(shape)}: {{")
            ms = sorted(by_m.items(), key=lambda kv: int(kv[0]))
            lines += [f"   {json.dumps(m)}: {json.dumps(e)}{',' if t < len(ms) - 1 else ''}" for t, (m, e) in
                      enumerate(ms)]
            lines.append(f"  }}{',' if j < len(shapes) - 1 else ''}")
        lines.append(f" }}{comma}")
    return "\n".join(lines + ["}"]) + "\n"


def write(path: Path, data: dict) -> None:
    """Validate ``data`` and write it to ``path`` atomically."""
    validate(data, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(format_table(data))
    os.replace(tmp, path)


def read(path: Path) -> dict:
    """A table file, validated (``ValueError`` when it is not JSON or not a table)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config table {path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    validate(data, str(path))
    return data


if __name__ == "__main__":  # python benchmarks/tune_table.py FILE...: check edited tables
    import sys

    for arg in sys.argv[1:]:
        validate(read(Path(arg)), arg)
        print(f"{arg}: valid")

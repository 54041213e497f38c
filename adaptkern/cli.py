"""The ``adaptkern`` command: ``bench``, ``check``, ``info`` and ``tune``.

    adaptkern bench [--suite core|mixed|all] [--quick] [--out DIR]   check, then time; table + results file
    adaptkern check                                                  correctness sweep against float64
    adaptkern info                                                   versions, device, execution path
    adaptkern tune [--kernels gemm,onepass,mixed,route] [--quick] [--out FILE]
                                                                     per-GPU config table (CUDA only)

On a machine without a GPU the fused ops run the PyTorch reference (or, with
``TRITON_INTERPRET=1``, the Triton kernels in the interpreter); ``bench`` then runs tiny
shapes and says that its timings are not GPU figures.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Optional, Sequence


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        return f"not importable ({type(e).__name__})"
    return str(getattr(mod, "__version__", "unknown version"))


def cmd_info(args) -> int:
    import torch

    import adaptkern
    from adaptkern.bench import baselines, default_device, report
    from adaptkern.ops import config

    device = default_device()
    print(f"adaptkern     {adaptkern.__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for name in ("triton", "transformers", "peft", "safetensors"):
        print(f"{name:<13} {_version(name)}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device        {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
              f"sm_{props.major}{props.minor}); driver {report._driver() or 'unknown'}")
    else:
        print(f"device        cpu ({platform.processor() or platform.machine()}); no CUDA GPU visible")
    print(f"interpreter   TRITON_INTERPRET={'1 (on)' if config.interpreting() else 'off'}")
    print(f"fused ops run {report.execution_path(device)}")
    print(f"mixed op      {'adaptkern.mixed_lora_linear' if baselines.has_mixed() else 'not available yet'}")
    return 0


def cmd_check(args) -> int:
    from adaptkern.bench import run_check

    return run_check()


def cmd_bench(args) -> int:
    from adaptkern.bench import run_bench

    split = lambda s: [v.strip() for v in s.split(",") if v.strip()] if s else None  # noqa: E731
    return run_bench(args.suite, quick=args.quick, out=args.out, impls=split(args.impls), modes=split(args.modes),
                     filter=args.filter, rep_ms=args.rep_ms, plot=not args.no_plot, cuda_graph=args.cuda_graph)


def cmd_tune(args) -> int:
    from adaptkern.bench.tune import KERNELS, run_tune

    kernels = [v.strip() for v in args.kernels.split(",") if v.strip()] if args.kernels else list(KERNELS)
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        print(f"adaptkern tune: unknown kernel(s) {', '.join(unknown)}; expected some of {','.join(KERNELS)}",
              file=sys.stderr)
        return 2
    return run_tune(kernels, quick=args.quick, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptkern",
                                description="adaptkern: fused adapter kernels — bench, check, info, tune")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="check correctness, then time fused vs baselines; write <out>/<gpu>.json + plot",
                       description="For every case: check the fused op against float64 (a failing kernel is never "
                                   "timed), then time fused, eager, peft, compiled_eager and base_linear with CUDA "
                                   "events (L2 flushed), print a table and write <out>/<gpu>.json and a plot.")
    b.add_argument("--suite", choices=("core", "mixed", "all"), default="core")
    b.add_argument("--quick", action="store_true", help="only the cases the targets name (a few minutes on a GPU)")
    b.add_argument("--out", default="bench-out", help="directory for <gpu>.json and <gpu>.png (default: bench-out)")
    b.add_argument("--filter", default=None,
                   help="only cases whose id contains each comma-separated substring, e.g. 'lora,M8192'")
    b.add_argument("--impls", default=None,
                   help="comma-separated subset of fused,eager,peft,compiled_eager,base_linear")
    b.add_argument("--modes", default=None, help="comma-separated subset of forward,forward_backward")
    b.add_argument("--rep-ms", type=float, default=100.0, help="GPU time spent in timed repetitions per measurement")
    b.add_argument("--cuda-graph", action="store_true",
                   help="time forward mode as CUDA-graph replays (GPU time without host overhead, as serving "
                        "stacks run decode); writes <gpu>-cudagraph.json")
    b.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("check", help="correctness sweep of the fused ops against float64; exit status 1 on failure")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("info", help="versions, device, and whether kernels or the reference run")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("tune", help="measure launch configs on this CUDA GPU; write the per-GPU config table",
                       description="For each kernel, shape (K=4096, N in {4096, 14336}, ranks 16/64/256) and M, "
                                   "check then time a small set of launch configs and the current heuristic; write "
                                   "adaptkern/ops/configs/<gpu>.json (see that folder's README.md). Needs CUDA: "
                                   "exits 2 without it.")
    t.add_argument("--kernels", default=None,
                   help="comma-separated subset of gemm,onepass,mixed,route (default: all; route is measured last, "
                        "with the configs just tuned)")
    t.add_argument("--quick", action="store_true",
                   help="fewer M, N=4096 and r=16 only, no second search step (estimated ~1.5 min on an H100)")
    t.add_argument("--out", default=None,
                   help="table file to write (default: adaptkern/ops/configs/<gpu>.json, the file lookups read); "
                        "sections for kernels not tuned in this run are kept from an existing file of the same GPU")
    t.set_defaults(func=cmd_tune)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

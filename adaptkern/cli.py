"""The ``adaptkern`` command (also ``python -m adaptkern``): ``bench``, ``check``, ``info``.

    adaptkern bench [--suite SUITE|all] [--quick] [--out DIR] ...   check, then time; table, results file, plot
    adaptkern check                                                      correctness sweep against float64
    adaptkern info                                                       versions, device, what the fused ops run
    adaptkern --version

Launch configs are tuned by a script of the source tree, ``python benchmarks/tune.py --out FILE``
(it is not installed with the package).
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Optional, Sequence

from adaptkern import __version__

EXIT_USAGE = 2
# adaptkern.bench.cases.SUITES (listed here so that building the parser imports no harness)
SUITES = ("core", "mixed", "qlora", "dora", "bottleneck_norm", "serving")


def cmd_info(args) -> int:
    import torch

    from adaptkern.bench import env

    device = env.default_device()
    print(f"adaptkern     {__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for name in env.PACKAGES[1:]:
        print(f"{name:<13} {env.package_version(name) or 'not installed'}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device        {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
              f"sm_{props.major}{props.minor}); driver {env.driver_version() or 'unknown'}")
    else:
        print(f"device        cpu ({platform.processor() or platform.machine()}); no CUDA GPU visible")
    print(f"interpreter   TRITON_INTERPRET={'1 (on)' if env.interpreting() else 'off'}")
    print(f"fused ops run {env.execution_path(device)}")
    return 0


def cmd_check(args) -> int:
    from adaptkern.bench.check import run_check

    return run_check()


def _split(s: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in s.split(",") if v.strip()] if s else None


def cmd_bench(args) -> int:
    from adaptkern.bench.run import UsageError, run_bench

    try:
        return run_bench(args.suite, quick=args.quick, out=args.out, impl_names=_split(args.impls),
                         modes=_split(args.modes), filter=args.filter, rep_ms=args.rep_ms, plot=not args.no_plot,
                         cuda_graph=args.cuda_graph)
    except UsageError as e:
        print(f"adaptkern bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaptkern", description="adaptkern: fused Triton kernels for LoRA and bottleneck adapters.",
        epilog="Tuning launch configs for a GPU: `python benchmarks/tune.py --out FILE` in a source checkout "
               "(see benchmarks/README.md).")
    p.add_argument("--version", action="version", version=f"adaptkern {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{bench,check,info}")

    b = sub.add_parser(
        "bench", help="check the fused ops, then time them against their baselines",
        description="For every case: check the fused op against float64 (a failing op is never timed and the "
                    "exit status is 1), then time fused, eager (plain PyTorch ops), peft (the real peft layer), "
                    "compiled_eager (torch.compile of eager), base_linear (F.linear alone) and each suite's own "
                    "baselines. Prints a table and writes <out>/<gpu>.json and <out>/<gpu>.png. On a GPU: "
                    "triton.testing.do_bench. Without one: tiny shapes, a smoke test of the harness, not a "
                    "measurement. Definitions: benchmarks/README.md.")
    b.add_argument("--suite", choices=(*SUITES, "all"), default="all",
                   help="core: one adapter per layer (LoRA, bottlenecks; forward and forward+backward); mixed: "
                        "every row its own LoRA adapter (forward); qlora: LoRA on a bitsandbytes NF4 weight "
                        "(training, decode); dora: DoRA training; bottleneck_norm: bottlenecks fused with the dense "
                        "and the norm; serving: q/k/v mixed LoRA and the delta ops; all: every suite (default)")
    b.add_argument("--quick", action="store_true", help="the representative cases of each suite (CI's job)")
    b.add_argument("--out", default="bench-out", help="directory for <gpu>.json and <gpu>.png (default: bench-out)")
    b.add_argument("--filter", default=None,
                   help="only cases whose id contains every comma-separated part, e.g. 'lora,M8192' (a filter "
                        "that matches nothing is an error)")
    b.add_argument("--impls", default=None,
                   help="comma-separated subset of fused,eager,peft,fuse_peft,compiled_eager,base_linear,dequant,lora,"
                        "vllm,delta,two_launch,graph_replay")
    b.add_argument("--modes", default=None, help="comma-separated subset of forward,forward_backward")
    b.add_argument("--rep-ms", type=float, default=100.0, help="GPU time spent in timed repetitions per measurement")
    b.add_argument("--cuda-graph", action="store_true",
                   help="time the forward mode as CUDA-graph replays (GPU time without host overhead, as serving "
                        "stacks run decode); writes <gpu>-cudagraph.json")
    b.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser(
        "check", help="correctness sweep of the fused ops against float64",
        description="Compares outputs and gradients of LoRA, both bottleneck placements and mixed-adapter batches "
                    "on small odd shapes, in float32, float16 and bfloat16, with a float64 evaluation: each error "
                    "must stay within twice what plain PyTorch makes in the same dtype (adaptkern.testing). "
                    "Exit status 1 when anything fails.")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("info", help="versions, device, and what the fused ops run here",
                       description="Prints the versions of adaptkern and its dependencies, the device, whether the "
                                   "Triton interpreter is on, and whether the fused ops run the Triton kernels or "
                                   "the PyTorch reference.")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

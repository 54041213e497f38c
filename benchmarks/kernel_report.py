"""Compiled-code report: the launches adaptkern's public ops make, lowered for sm_90a on a CPU.

No GPU is needed. Each scenario calls the public API (``adaptkern.functional``,
``adaptkern.mixed``) on CPU tensors of the real shapes with the launchers switched to their
Triton path and every ``JITFunction.run`` recorded instead of executed. Each recorded launch
is then compiled exactly as the JIT would compile it on an H100/H200: the JIT's own binder
specialises the arguments (16-byte pointer alignment, divisibility by 16 of integers and
strides, integers equal to 1 folded into constants), then ``triton.compile`` for sm_90a.
From the cubin (``ptxas -v`` with Triton's own flags, ``cuobjdump -res-usage``, the SASS from
``nvdisasm``) each row reports:

* ``regs``, ``spill`` (spill store + load bytes per thread), ``smem`` (dynamic shared memory);
* ``CTA/SM``: resident CTAs per SM on sm_90 and what limits them (regs, smem, warps);
* ``mma``: ``wgmma`` (HGMMA), ``mma.sync`` (HMMA), both, or ``fma`` (no tensor cores);
* hot loop (the innermost SASS loop with the most MMA instructions: the K loop): instructions per
  iteration, MMA instructions per iteration, 16-byte cp.async per iteration and plain
  global loads (LDG) per iteration;
* for every launch with a tensor-core K loop, a plain Triton matmul (Triton's tutorial
  kernel) at the same tiles, warps and stages, compiled the same way, as the reference row.

Ceilings (``--check``; tests/ops/test_compiled_code.py runs it in CI):

* every launch compiles and fits sm_90's 227 KiB of shared memory per block;
* no 16-bit (bf16/fp16) launch spills, dropout included, and every one streams its K loop
  through cp.async (no plain LDG in the loop) — shapes not divisible by 16 excepted (group
  "unaligned": no 16-byte alignment can be proven, so loads go through registers);
* every 16-bit launch with BLOCK_M >= 64 runs its dots on wgmma (no mma.sync);
* the hot GEMM launches (split main GEMM, dX, one-pass, mixed linear (one slice and q/k/v) at
  M=8192) use at most 110 % of the reference matmul's registers and reach its CTAs per SM.
* 4-bit base launches (group "quantized", ``adaptkern.quantized.qlora_linear``): the spill,
  shared-memory and wgmma ceilings; not the cp.async one (the double-quantized scale is a
  1-byte gather per row and tile, the packed bytes of a two-stage loop a plain 16-byte load).

Usage: ``python benchmarks/kernel_report.py [--check] [--json PATH] [--quick] [--only SUBSTR]``
(TRITON_INTERPRET must be unset or 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_report.py compiles for the GPU: run it with TRITON_INTERPRET unset or 0")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; silences Triton 3.9's warning
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from adaptkern import functional as F  # noqa: E402
from adaptkern import mixed as MX  # noqa: E402
from adaptkern import serving as SV  # noqa: E402
from adaptkern.ops import config  # noqa: E402
from adaptkern.ops.adapter_linear import op as AL  # noqa: E402
from adaptkern.ops.lora_delta import op as LD  # noqa: E402
from adaptkern.ops.mixed_adapter_linear import op as MAL  # noqa: E402

ARCH = 90
SMS = 132  # H100 SXM / H200
# sm_90 per-SM limits
REGS_PER_SM = 65536
SMEM_PER_SM = 233472  # 228 KiB
SMEM_PER_BLOCK = 232448  # 227 KiB
SMEM_RESERVED_PER_CTA = 1024
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
REG_CEILING = 1.10  # hot launches: registers within 10 % of the reference matmul

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _tool(name: str) -> str:
    return str(_BIN / name)


# --------------------------------------------------------------------------------------------
# Capture


@dataclass
class Launch:
    scenario: str
    role: str
    fn: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    hot: bool = False


@contextlib.contextmanager
def capturing(record: list):
    """Launchers take their Triton path on CPU tensors; every JIT launch is recorded, not run."""
    patches = [(JITFunction, "run", None), (AL, "use_triton", lambda x: True), (MAL, "use_triton", lambda x: True),
               (QL, "use_triton", lambda x: True), (LD, "use_triton", lambda x: True)]

    def run(self, *args, grid, warmup, **kwargs):
        record.append((self, tuple(grid) if not callable(grid) else grid, args, kwargs))
        return None

    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, run if new is None else new)
    try:
        with config.assume_sms(SMS):
            yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


def _names(tensors: dict) -> dict:
    """data_ptr → name of the scenario's own tensors (and their transposes), to name operands."""
    return {t.data_ptr(): n for n, t in tensors.items() if t is not None and t.numel()}


# (kernel, first operand, second operand) → role
_ROLES = {
    ("_dual_gemm_kernel", "x", "A"): "split shrink x·Aᵀ",
    ("_dual_gemm_kernel", "x", "W"): "split main x·Wᵀ+S·Bᵀ",
    ("_dual_gemm_kernel", "dY", "B"): "bwd dZ=dY·B",
    ("_dual_gemm_kernel", "dY", "W"): "bwd dX=dY·W+dZ·A",
    ("_dual_gemm_kernel", "dY", "x"): "bwd dW=dYᵀ·x",
    ("_dual_gemm_kernel", "?", "x"): "bwd dA=dZᵀ·x",
    ("_dual_gemm_kernel", "dY", "?"): "bwd dB=dYᵀ·S",
    ("_adapter_linear_onepass_kernel", "x", "W"): "one-pass",
    ("_mixed_adapter_linear_shrink_kernel", "x", "A"): "mixed shrink x·A_sᵀ",
    ("_mixed_adapter_linear_shrink_kernel", "dY", "B"): "mixed bwd dY·B_s",
    ("_mixed_adapter_linear_kernel", "x", "W"): "mixed linear",
    ("_mixed_adapter_linear_kernel", "dY", "W"): "mixed bwd dX",
    ("_mixed_adapter_linear_segment_kernel", "?", "x"): "mixed bwd dA_s",
    ("_mixed_adapter_linear_segment_kernel", "dY", "?"): "mixed bwd dB_s",
}
_OPERANDS = {  # the two input operands of each kernel (positional indices)
    "_dual_gemm_kernel": (1, 2), "_adapter_linear_onepass_kernel": (2, 3),
    "_mixed_adapter_linear_shrink_kernel": (1, 2),
    "_mixed_adapter_linear_kernel": (2, 3), "_mixed_adapter_linear_segment_kernel": (1, 2),
}


def _role(fn, args, kwargs, names) -> str:
    kname = fn.fn.__name__
    if kname == "_mixed_adapter_linear_kernel" and not kwargs.get("BASE", True):  # the serving delta
        return "delta one-launch" if kwargs.get("FUSED_SHRINK") else "delta expand"
    if kname not in _OPERANDS:
        return kname.strip("_")
    # a tuple operand (the slices of a packed projection) is named by its first slice
    first = [args[i][0] if isinstance(args[i], tuple) and args[i] else args[i] for i in _OPERANDS[kname]]
    ops = [names.get(t.data_ptr(), "?") if isinstance(t, torch.Tensor) else "?" for t in first]
    return _ROLES.get((kname, *ops), f"{kname.strip('_')}({', '.join(ops)})")


def _params(m, k, n, r, dtype, *, s=None, bias=False, grad=True):
    e = dict(dtype=dtype)
    x = torch.empty(m, k, **e, requires_grad=grad)
    w = torch.empty(n, k, **e)
    b = torch.empty(n, **e) if bias else None
    if s is None:
        a = torch.empty(r, k, **e, requires_grad=grad)
        bw = torch.empty(n, r, **e, requires_grad=grad)
    else:
        a = torch.empty(s, r, k, **e, requires_grad=grad)
        bw = torch.empty(s, n, r, **e, requires_grad=grad)
    return x, w, b, a, bw


def _run_scenario(name, body, hot_roles=()) -> list[Launch]:
    record, tensors = [], {}
    with capturing(record):
        body(tensors)
    names = _names(tensors)
    out = []
    for fn, grid, args, kwargs in record:
        role = _role(fn, args, kwargs, names)
        out.append(Launch(name, role, fn, grid, args, kwargs, hot=role in hot_roles))
    return out


def _lora(m, k, n, r, dtype, *, train=True, dropout=0.0, route="auto", bias=False, w_t=False):
    def body(t):
        x, w, b, a, bw = _params(m, k, n, r, dtype, bias=bias, grad=train)
        if w_t:  # a transposed weight view (W stored [K, N]): the contiguous dimension is N
            w = torch.empty(k, n, dtype=dtype).t()
        dy = torch.empty(m, n, dtype=dtype)
        t.update(x=x, W=w, A=a, B=bw, dY=dy)
        with torch.set_grad_enabled(train):
            y = F.lora_linear(x, w, b, a, bw, scale=2.0, dropout=dropout, route=route)
            if train:
                y.backward(dy)
    return body


def _bottleneck(m, k, n, r, dtype, *, act="gelu"):
    def body(t):
        e = dict(dtype=dtype)
        x = torch.empty(m, k, **e, requires_grad=True)
        w, b = torch.empty(n, k, **e), torch.empty(n, **e)
        d = torch.empty(r, k, **e, requires_grad=True)
        db = torch.empty(r, **e, requires_grad=True)
        u = torch.empty(n, r, **e, requires_grad=True)
        ub = torch.empty(n, **e, requires_grad=True)
        dy = torch.empty(m, n, **e)
        t.update(x=x, W=w, A=d, B=u, dY=dy)
        y = F.bottleneck_linear(x, w, b, d, db, u, ub, activation=act, placement="parallel")
        y.backward(dy)
    return body


def _mixed(m, k, n, r, s, dtype, *, train=False):
    def body(t):
        x, w, b, a, bw = _params(m, k, n, r, dtype, s=s, grad=train)
        ids = torch.randint(-1, s, (m,), dtype=torch.int32)
        scales = torch.ones(s)
        dy = torch.empty(m, n, dtype=dtype)
        t.update(x=x, W=w, A=a, B=bw, dY=dy)
        with torch.set_grad_enabled(train):
            y = MX.mixed_lora_linear(x, w, b, a, bw, ids, scales=scales)
            if train:
                y.backward(dy)
    return body


def _mixed_slices(m, k, widths, r, s, dtype):
    """Packed projection (q/k/v): one LoRA per output slice, the fused forward."""
    def body(t):
        x, w, b, a, bw = _params(m, k, sum(widths), r, dtype, s=s, grad=False)
        a_list = [a] + [torch.empty(s, r, k, dtype=dtype) for _ in widths[1:]]
        b_list = [torch.empty(s, n, r, dtype=dtype) for n in widths]
        t.update(x=x, W=w, A=a, B=b_list[0])
        MX.mixed_lora_linear(x, w, b, a_list, b_list, torch.randint(-1, s, (m,), dtype=torch.int32),
                             output_slices=widths)
    return body


def _delta(m, k, widths, r, s, dtype):
    """Serving delta into an engine's buffer: ``serving.add_lora_delta`` (one launch or two, its choice)."""
    def body(t):
        x, y = torch.empty(m, k, dtype=dtype), torch.empty(m, sum(widths), dtype=dtype)
        a_list = [torch.empty(s, r, k, dtype=dtype) for _ in widths]
        b_list = [torch.empty(s, n, r, dtype=dtype) for n in widths]
        t.update(x=x, A=a_list[0], B=b_list[0], dY=y)
        SV.add_lora_delta(y, x, a_list, b_list, torch.randint(-1, s, (m,), dtype=torch.int32), scales=torch.ones(s))
    return body


def _dropout_mask(m, k, p):
    def body(t):
        AL.dropout_mask(torch.tensor([1234], dtype=torch.int64), m, k, p)
    return body


HOT = ("split main x·Wᵀ+S·Bᵀ", "bwd dX=dY·W+dZ·A", "one-pass", "mixed linear")


def scenarios(quick: bool = False):
    """(name, body, hot roles, group). Group "report": the bf16 report; "coverage": other
    dtypes, layouts and shapes (16-bit ones under the same ceilings); "unaligned": a shape not
    divisible by 16 (must compile; reported, no spill or cp.async ceiling)."""
    bf, K, N = torch.bfloat16, 4096, 4096
    yield "lora r16 M8192 train", _lora(8192, K, N, 16, bf), HOT, "report"
    yield "lora r16 M8192 onepass", _lora(8192, K, N, 16, bf, train=False, route="onepass"), HOT, "report"
    yield "lora r16 M1024 fwd", _lora(1024, K, N, 16, bf, train=False), (), "report"
    yield "lora r16 M16 decode", _lora(16, K, N, 16, bf, train=False), (), "report"
    yield "lora r64 M256 fwd", _lora(256, K, N, 64, bf, train=False), (), "report"
    yield "lora r16 M8192 dropout", _lora(8192, K, N, 16, bf, dropout=0.1), (), "report"
    yield "mixed S32 r16 M8192", _mixed(8192, K, N, 16, 32, bf), HOT, "report"
    yield "mixed S32 r16 M64 decode", _mixed(64, K, N, 16, 32, bf), (), "report"
    yield "mixed S32 r16 M16 decode", _mixed(16, K, N, 16, 32, bf), (), "report"
    qkv = (K, K // 4, K // 4)  # grouped-query attention: q 4096, k 1024, v 1024
    yield "mixed qkv S32 r16 M8192", _mixed_slices(8192, K, qkv, 16, 32, bf), HOT, "report"
    yield "mixed qkv S32 r16 M64 decode", _mixed_slices(64, K, qkv, 16, 32, bf), (), "report"
    yield "delta v S32 r16 M4 decode", _delta(4, K, (K // 4,), 16, 32, bf), (), "report"  # one launch
    yield "delta qkv S32 r16 M4 decode", _delta(4, K, qkv, 16, 32, bf), (), "report"  # shrink + expand
    yield "delta qkv S32 r16 M2048", _delta(2048, K, qkv, 16, 32, bf), (), "report"
    yield from quantized_scenarios(quick)
    if quick:
        return
    yield "bottleneck R256 M8192 gelu", _bottleneck(8192, K, N, 256, bf), (), "report"
    yield "mixed S32 r16 M8192 train", _mixed(8192, K, N, 16, 32, bf, train=True), (), "report"
    yield "dropout mask M8192", _dropout_mask(8192, K, 0.1), (), "coverage"
    yield "lora r16 M8192 fp16 train", _lora(8192, K, N, 16, torch.float16), (), "coverage"
    yield "lora r64 M1024 fp16 onepass", _lora(1024, K, N, 64, torch.float16, train=False, route="onepass"), (), \
        "coverage"
    yield "mixed S8 r16 M8192 fp16", _mixed(8192, K, N, 16, 8, torch.float16), (), "coverage"
    yield "lora r16 M1024 bf16 Wᵀ onepass", _lora(1024, K, N, 16, bf, train=False, route="onepass", w_t=True), (), \
        "coverage"
    yield "lora r16 M8192 bf16 Wᵀ train", _lora(8192, K, N, 16, bf, w_t=True), (), "coverage"
    # K=1000 is not a multiple of 16: no 16-byte alignment can be proven, loads go through registers
    yield "lora r8 M300 K1000 bf16 bias", _lora(300, 1000, 520, 8, bf, bias=True), (), "unaligned"
    for dt in (torch.float32, torch.float64):
        tag = str(dt).split(".")[-1]
        yield f"lora r16 M1 {tag} onepass", _lora(1, 512, 512, 16, dt, train=False), (), "coverage"
        yield f"lora r16 M2048 {tag} train", _lora(2048, 1024, 1024, 16, dt, dropout=0.1, bias=True), (), "coverage"
        yield f"mixed S4 r16 M2048 {tag} train", _mixed(2048, 1024, 1024, 16, 4, dt, train=True), (), "coverage"


# --------------------------------------------------------------------------------------------
# 4-bit base (QLoRA): qlora_linear on a bitsandbytes-layout weight (NF4, blocksize 64, double
# quantization unless "plain absmax"); the packed tensors are empty, only their shapes matter.

from adaptkern.ops.quantized_lora_linear import op as QL  # noqa: E402
from adaptkern.quantized import QuantizedWeight, qlora_linear  # noqa: E402


def _qlora(m, k, n, r, dtype, *, train=True, route="auto", nested=True, blocksize=64):
    def body(t):
        blocks = -(-n * k // blocksize)
        qw = QuantizedWeight(
            torch.empty((n * k + 1) // 2, dtype=torch.uint8),
            torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32), torch.empty(16), (n, k), blocksize,
            "nf4", dtype, *((torch.empty(-(-blocks // 256)), torch.empty(256), torch.empty(1)) if nested else ()))
        x = torch.empty(m, k, dtype=dtype, requires_grad=train)
        a = torch.empty(r, k, dtype=dtype, requires_grad=train)
        bw = torch.empty(n, r, dtype=dtype, requires_grad=train)
        dy = torch.empty(m, n, dtype=dtype)
        t.update(x=x, A=a, B=bw, dY=dy)
        with torch.set_grad_enabled(train):
            y = qlora_linear(x, qw, None, None, a, bw, scale=2.0, route=route)
            if train:
                y.backward(dy)
    return body


def quantized_scenarios(quick: bool = False):
    """The 4-bit scenarios of :func:`scenarios` (group "quantized")."""
    bf, K, N = torch.bfloat16, 4096, 4096
    yield "qlora r16 M8192 train", _qlora(8192, K, N, 16, bf), (), "quantized"
    if quick:
        return
    yield "qlora r16 M1024 onepass", _qlora(1024, K, N, 16, bf, train=False, route="onepass"), (), "quantized"
    yield "qlora r16 M16 decode", _qlora(16, K, N, 16, bf, train=False), (), "quantized"
    yield "qlora r16 M16 decode plain absmax", _qlora(16, K, N, 16, bf, train=False, nested=False), (), "quantized"
    yield "qlora r16 M8192 fp16 train", _qlora(8192, K, N, 16, torch.float16), (), "quantized"
    # K % blocksize != 0: blocks cross rows, every element gathers its own byte, code and scale
    yield "qlora r8 M300 K1000 train", _qlora(300, 1000, 520, 8, bf), (), "quantized"


# --------------------------------------------------------------------------------------------
# Compile as the JIT would


_TARGET = GPUTarget("cuda", ARCH, 32)
_BACKEND = None
_CACHE: dict = {}


def _backend():
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = make_backend(_TARGET)
    return _BACKEND


def specialise(fn: JITFunction, args, kwargs):
    """The JIT's own binder and packing: (cache key, signature, constexprs, attrs, options)."""
    backend = _backend()
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    key = (fn.fn.__qualname__, str(spec), str(sorted(options.__dict__.items())))
    return key, signature, constexprs, attrs, options


def compile_launch(fn: JITFunction, args, kwargs):
    key, signature, constexprs, attrs, options = specialise(fn, args, kwargs)
    if key not in _CACHE:
        _CACHE[key] = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_TARGET,
                                     options=options.__dict__)
    return _CACHE[key], constexprs, options


# --------------------------------------------------------------------------------------------
# Read the cubin


@dataclass
class Facts:
    regs: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    stack: int = 0
    smem: int = 0
    warps: int = 0
    ctas_sm: int = 0
    limiter: str = ""
    mma: str = ""
    mma_shape: str = ""
    loop_instr: int = 0
    loop_mma: int = 0
    loop_cp16: int = 0
    loop_cp_narrow: int = 0
    loop_ldg: int = 0
    total_instr: int = 0
    mufu: int = 0

    @property
    def spill(self) -> int:
        return self.spill_st + self.spill_ld


def _ptxas_facts(ptx: str, enable_fp_fusion: bool) -> tuple[int, int, int, int]:
    """(registers, spill-store bytes, spill-load bytes, stack bytes) from ``ptxas -v`` with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(ARCH).path, "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(ARCH)}", str(src), "-o",
               str(Path(d) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(m.group(2)), int(m.group(3)), int(m.group(1))


def _res_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))


def sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout


_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_MMA = re.compile(r"\b(HGMMA|HMMA|DMMA|IMMA)\b")


def parse_sass(text: str):
    """[(addr, text)] and {label: addr}."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = _LABEL.match(line.strip())
        if lab:
            pending.append(lab.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for p in pending:
                labels[p] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    return instrs, labels


def hot_loop(instrs, labels):
    """The K loop: of the innermost loops (backward branches) holding an MMA, the one with the
    most MMA instructions (the first such on a tie): [(addr, text)] or None."""
    loops = []
    for i, (addr, txt) in enumerate(instrs):
        b = _BRA.search(txt)
        if b and labels.get(b.group(1), addr + 1) <= addr:
            start = labels[b.group(1)]
            body = [(a, t) for a, t in instrs[: i + 1] if a >= start]
            loops.append((start, addr, body))
    with_mma = [lp for lp in loops if any(_MMA.search(t) for _, t in lp[2])]
    inner = [lp for lp in with_mma if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] for o in with_mma)]
    if not inner:
        return None
    return max(inner, key=lambda lp: (sum(bool(_MMA.search(t)) for _, t in lp[2]), -lp[0]))[2]


def _opcode(text: str) -> str:
    """``@!P0 LDG.E.128 R4, ...`` → ``LDG``."""
    words = text.split()
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def ctas_per_sm(regs: int, smem: int, warps: int) -> tuple[int, str]:
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = REGS_PER_SM // (per_warp * warps) if regs else MAX_CTAS_PER_SM
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)
    by_warps = MAX_WARPS_PER_SM // warps
    limits = {"regs": by_regs, "smem": by_smem, "warps": by_warps, "ctas": MAX_CTAS_PER_SM}
    n = min(limits.values())
    return n, "+".join(k for k, v in limits.items() if v == n)


def facts(kernel, warps: int, enable_fp_fusion: bool = True) -> Facts:
    f = Facts(warps=warps, smem=kernel.metadata.shared)
    f.regs, f.spill_st, f.spill_ld, f.stack = _ptxas_facts(kernel.asm["ptx"], enable_fp_fusion)
    res = _res_usage(kernel.asm["cubin"])
    if res["REG"] != f.regs:  # ptxas rerun must agree with Triton's own cubin
        raise RuntimeError(f"ptxas -v says {f.regs} registers, the cubin {res['REG']}")
    f.ctas_sm, f.limiter = ctas_per_sm(f.regs, f.smem, warps)
    instrs, labels = parse_sass(sass(kernel.asm["cubin"]))
    f.total_instr = len(instrs)
    kinds = {m.group(1) for _, t in instrs for m in [_MMA.search(t)] if m}
    f.mma = "+".join(sorted({"HGMMA": "wgmma", "HMMA": "mma.sync", "DMMA": "dmma", "IMMA": "imma"}[k] for k in kinds)) \
        or "fma"
    shapes = sorted({re.search(r"HGMMA\.(\w+)", t).group(1) for _, t in instrs if "HGMMA" in t})
    f.mma_shape = ",".join(shapes)
    f.mufu = sum("MUFU" in t for _, t in instrs)
    loop = hot_loop(instrs, labels)
    if loop:
        f.loop_instr = len(loop)
        f.loop_mma = sum(bool(_MMA.search(t)) for _, t in loop)
        f.loop_cp16 = sum("LDGSTS" in t and ".128" in t for _, t in loop)
        f.loop_cp_narrow = sum("LDGSTS" in t and ".128" not in t for _, t in loop)
        f.loop_ldg = sum(_opcode(t) == "LDG" for _, t in loop)
    return f


# --------------------------------------------------------------------------------------------
# The reference: a plain Triton matmul at the same tiles, warps and stages


@triton.jit
def reference_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Triton's tutorial matmul (03-matrix-multiplication), fp32 accumulator."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c = acc.to(c_ptr.dtype.element_ty)
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + offs_cm[:, None] * stride_cm + offs_cn[None, :] * stride_cn, c,
             mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


def reference_facts(block_m, block_n, block_k, group_m, warps, stages, dtype=torch.bfloat16, m=8192, n=4096,
                    k=4096) -> Facts:
    """Facts of the plain matmul ``[m, k]·[k, n]`` (x·Wᵀ: W is [n, k] row-major) at these tiles."""
    a = torch.empty(m, k, dtype=dtype)
    b = torch.empty(n, k, dtype=dtype).t()
    c = torch.empty(m, n, dtype=dtype)
    kernel, _, _ = compile_launch(reference_matmul, (a, b, c, m, n, k, *a.stride(), *b.stride(), *c.stride()),
                                  dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                                       num_warps=warps, num_stages=stages))
    return facts(kernel, warps)


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class Row:
    scenario: str
    role: str
    group: str
    kernel: str
    dtype: str
    grid: str
    ctas: int
    tiles: str
    warps: int
    stages: int
    facts: Facts
    hot: bool = False
    ref: Optional[Facts] = None
    flags: str = ""
    failures: list = field(default_factory=list)


_DTYPE_NAMES = {tl.bfloat16: "bf16", tl.float16: "fp16", tl.float32: "fp32", tl.float64: "fp64"}


def _grid_size(grid) -> int:
    n = 1
    for g in grid:
        n *= g
    return n


def _flags(kwargs) -> str:
    keep = ("HAS_SECOND", "EPILOGUE", "DROP", "DROPOUT", "SPLIT_K", "SORTED", "ACT", "STORE_Z")
    on = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in kwargs.items() if k in keep and v not in (0, False)]
    return " ".join(on)


def build_rows(launches, group, log=print) -> list[Row]:
    rows = []
    for ln in launches:
        t0 = time.time()
        kernel, constexprs, options = compile_launch(ln.fn, ln.args, ln.kwargs)
        kw = ln.kwargs
        f = facts(kernel, options.num_warps, options.enable_fp_fusion)
        tiles = "×".join(str(kw.get(b, "-")) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        tiles += "".join(f" {tag}{kw[b]}" for b, tag in (("BLOCK_R", "r"), ("BLOCK_K2", "k2")) if b in kw)
        dt = _DTYPE_NAMES.get(kw.get("DOT_DTYPE"), "?")
        row = Row(ln.scenario, ln.role, group, ln.fn.fn.__name__, dt, "×".join(map(str, ln.grid)), _grid_size(ln.grid),
                  tiles, options.num_warps, options.num_stages, f, ln.hot, flags=_flags(kw))
        if f.loop_mma and f.mma in ("wgmma", "mma.sync", "mma.sync+wgmma") and "BLOCK_M" in kw and "BLOCK_N" in kw:
            ref_dtype = torch.float16 if dt == "fp16" else torch.bfloat16
            row.ref = reference_facts(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw.get("GROUP_M", 8),
                                      options.num_warps, options.num_stages, ref_dtype)
        rows.append(row)
        log(f"  compiled {ln.scenario} / {ln.role} ({time.time() - t0:.1f} s)", file=sys.stderr)
    return rows


def check(rows: list[Row]) -> list[str]:
    """The ceilings; returns the failures (also stored on each row as "kind: message", kind one
    of spill, smem, async, wgmma, regs, occupancy)."""
    fails = []
    for r in rows:
        f = r.facts
        sixteen = r.dtype in ("bf16", "fp16")
        if sixteen and f.spill and r.group != "unaligned":
            r.failures.append(f"spill: {f.spill_st} B stores / {f.spill_ld} B loads per thread")
        if f.smem > SMEM_PER_BLOCK:
            r.failures.append(f"smem: {f.smem} B shared memory > {SMEM_PER_BLOCK} B per block")
        bm = int(r.tiles.split("×")[0]) if r.tiles and r.tiles[0].isdigit() else 0
        if sixteen and r.group not in ("unaligned", "quantized") and f.loop_ldg:
            r.failures.append(f"async: {f.loop_ldg} plain global loads (LDG) in the K loop, not cp.async")
        if sixteen and bm >= 64 and "mma.sync" in f.mma:
            r.failures.append(f"wgmma: BLOCK_M={bm} dot on mma.sync")
        if r.hot and r.ref is not None and "M8192" in r.scenario:
            if f.regs > REG_CEILING * r.ref.regs:
                r.failures.append(f"regs: {f.regs} registers > {REG_CEILING:.2f} × reference {r.ref.regs}")
            if f.ctas_sm < r.ref.ctas_sm:
                r.failures.append(f"occupancy: {f.ctas_sm} CTAs/SM < reference {r.ref.ctas_sm}")
        fails += [f"{r.scenario} / {r.role}: {msg}" for msg in r.failures]
    return fails


HEADER = ("scenario", "launch", "dt", "CTAs", "tile", "w", "st", "regs", "spill", "smem", "CTA/SM", "mma",
          "loop instr", "mma/it", "cp16/it", "ldg/it", "ref regs", "ref CTA/SM", "ref instr", "")


def table(rows: list[Row]) -> str:
    body = []
    for r in rows:
        f, ref = r.facts, r.ref
        body.append((
            r.scenario, r.role + (" *" if r.hot else ""), r.dtype, str(r.ctas), r.tiles, str(r.warps), str(r.stages),
            str(f.regs), f"{f.spill_st}/{f.spill_ld}" if f.spill else "0", str(f.smem), f"{f.ctas_sm} ({f.limiter})",
            f.mma, str(f.loop_instr or "-"), str(f.loop_mma or "-"), str(f.loop_cp16 or "-"), str(f.loop_ldg or "-"),
            str(ref.regs) if ref else "", f"{ref.ctas_sm}" if ref else "", str(ref.loop_instr) if ref else "",
            "FAIL: " + "; ".join(r.failures) if r.failures else ""))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths[:-1]))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a ceiling is not met")
    ap.add_argument("--json", type=Path, help="write every row as JSON here")
    ap.add_argument("--quick", action="store_true", help="the bf16 hot scenarios only")
    ap.add_argument("--only", default="", help="scenarios whose name contains this")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = []
    for name, body, hot, group in scenarios(args.quick):
        if args.only and args.only not in name:
            continue
        launches = _run_scenario(name, body, hot)
        rows += build_rows(launches, group)
    fails = check(rows)
    print(f"sm_{ARCH}a, {SMS} SMs; '*' = hot launch (ceilings: regs <= {REG_CEILING:.2f} × ref, CTA/SM >= ref); "
          "spill = store/load bytes per thread; loop columns = the K loop's SASS per iteration; "
          "ref = plain Triton matmul at the same tile/warps/stages")
    print(table(rows))
    print(f"{len(rows)} launches, {len(_CACHE)} distinct kernels compiled in {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([{**{k: v for k, v in asdict(r).items() if k not in ("facts", "ref")},
                                          "facts": asdict(r.facts), "ref": asdict(r.ref) if r.ref else None}
                                         for r in rows], indent=1))
    if fails:
        print("ceilings not met:\n  " + "\n  ".join(fails))
    return 1 if (args.check and fails) else 0


if __name__ == "__main__":
    sys.exit(main())

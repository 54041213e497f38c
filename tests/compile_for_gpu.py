"""Compile every Triton kernel variant for a GPU target, without a GPU (ahead of time).

The interpreter runs kernel *semantics* on a CPU but accepts code the GPU compiler rejects
(non-constexpr globals, loop-carried type changes, dot shapes). This script lowers each
kernel through Triton's real pipeline to PTX and cubin for sm_90, so those errors show in
CI. Run with TRITON_INTERPRET unset (tests/test_compile_for_gpu.py does).

Usage: python tests/compile_for_gpu.py [--arch 90]; prints one line per variant, exits 1 on
the first failure.
"""

import argparse
import inspect
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_for_gpu.py must run with TRITON_INTERPRET unset")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adaptkern.ops import config  # noqa: E402
from adaptkern.ops import mixed_kernels as MK  # noqa: E402
from adaptkern.ops import triton_kernels as K  # noqa: E402

FLOATS = {"alpha1", "alpha2", "dropout_p", "scale", "p"}
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def compile_variant(fn, ptrs, consts, arch, num_warps=4, num_stages=3):
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: "constexpr" if p in consts else ptrs.get(p, "fp32" if p in FLOATS else "i32") for p in params}
    src = ASTSource(fn, sig, constexprs={(params.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    return kernel.metadata.shared


def variants():
    """Every kernel, each constexpr branch at least once, in bf16 (tensor cores) and fp32 (ieee)."""
    for dt, ptr in ((tl.bfloat16, "*bf16"), (tl.float32, "*fp32")):
        acc = dict(DOT_DTYPE=dt, ACC=tl.float32, PRECISION="ieee" if dt == tl.float32 else "tf32")
        for on in (True, False) if dt == tl.bfloat16 else (False,):
            act = 3 if on else 0
            yield "onepass", K._onepass_fwd_kernel, dict(
                y_ptr=ptr, z_ptr="*fp32", x_ptr=ptr, w_ptr=ptr, bias_ptr=ptr, aw_ptr=ptr, ab_ptr=ptr, bw_ptr=ptr,
                bb_ptr=ptr, seed_ptr="*i64"), dict(
                HAS_BIAS=on, HAS_AB=on, HAS_BB=on, STORE_Z=on, ACT=act, DROPOUT=on, **acc,
                BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_R=32, GROUP_M=8), 4
            yield "mixed_shrink", MK._mixed_shrink_kernel, dict(
                p_ptr="*fp32", x_ptr=ptr, a_ptr=ptr, ids_ptr="*i32", perm_ptr="*i32", ranks_ptr="*i32"), dict(
                SORTED=on, HAS_RANKS=on, **acc, BLOCK_M=16, BLOCK_K=64, BLOCK_R=16), 4
            yield "mixed_linear", MK._mixed_linear_kernel, dict(
                y_ptr=ptr, z_ptr="*fp32", x_ptr=ptr, w_ptr=ptr, bias_ptr=ptr, p_ptr="*fp32", ab_ptr=ptr, b_ptr=ptr,
                bb_ptr=ptr, scales_ptr="*fp32", ranks_ptr="*i32", acts_ptr="*i32", ids_ptr="*i64",
                perm_ptr="*i32"), dict(
                SORTED=on, HAS_BIAS=on, HAS_AB=on, HAS_BB=on, HAS_SCALES=on, HAS_RANKS=on, HAS_ACTS=on, STORE_Z=on,
                **acc, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_R=16), 4
        gemms = ((0, 0, True, 1), (1, 1, False, 1), (2, 0, False, 1), (0, 3, True, 1), (0, 2, False, 4))
        for epi, drop, second, split in gemms if dt == tl.bfloat16 else gemms[:1]:
            yield "gemm", K._gemm_kernel, dict(
                c_ptr=ptr if split == 1 and epi != 1 else "*fp32", p1_ptr=ptr, q1_ptr=ptr, p2_ptr="*fp32",
                q2_ptr=ptr, bias1_ptr=ptr, bias2_ptr=ptr, z_ptr="*fp32", seed_ptr="*i64"), dict(
                HAS_SECOND=second, HAS_BIAS1=True, HAS_BIAS2=second, EPILOGUE=epi, STORE_Z=epi == 1, ACT=4,
                DROP=drop, SPLIT_K=split, **acc, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 8
    yield "segment_gemm", MK._segment_gemm_kernel, dict(
        out_ptr="*fp32", p_ptr="*fp32", q_ptr="*bf16", perm_ptr="*i32", offsets_ptr="*i32", scales_ptr="*fp32"), dict(
        HAS_SCALES=True, SPLIT=4, DOT_DTYPE=tl.bfloat16, ACC=tl.float32, PRECISION="tf32", BLOCK_M=64,
        BLOCK_N=64, BLOCK_K=64), 4
    yield "dropout_mask", K._dropout_mask_kernel, dict(out_ptr="*i8", seed_ptr="*i64"), dict(BLOCK=1024), 4


def table_variants():
    """The block shapes config.py hands out, per operand size, at decode and prefill sizes:
    they must fit the GPU's shared memory (the fixed shapes above need not)."""
    for dt, ptr, elem in ((tl.bfloat16, "*bf16", 2), (tl.float32, "*fp32", 4), (tl.float64, "*fp64", 8)):
        acc_t = tl.float64 if elem == 8 else tl.float32
        acc_p = "*fp64" if elem == 8 else "*fp32"
        acc = dict(DOT_DTYPE=dt, ACC=acc_t, PRECISION="tf32" if elem == 2 else "ieee")
        for m in (1, 8192):
            c = config.gemm_config(m, 4096, elem)
            yield f"gemm-table-M{m}", K._gemm_kernel, dict(
                c_ptr=ptr, p1_ptr=ptr, q1_ptr=ptr, p2_ptr=acc_p, q2_ptr=ptr, bias1_ptr=ptr, bias2_ptr=ptr,
                z_ptr=acc_p, seed_ptr="*i64"), dict(
                HAS_SECOND=True, HAS_BIAS1=True, HAS_BIAS2=True, EPILOGUE=0, STORE_Z=False, ACT=0, DROP=0, SPLIT_K=1,
                **acc, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m), \
                (c.num_warps, c.num_stages)
            p = config.mixed_plan(m, 4096, 16, elem)
            yield f"mixed_linear-table-M{m}", MK._mixed_linear_kernel, dict(
                y_ptr=ptr, z_ptr=acc_p, x_ptr=ptr, w_ptr=ptr, bias_ptr=ptr, p_ptr=acc_p, ab_ptr=ptr, b_ptr=ptr,
                bb_ptr=ptr, scales_ptr=acc_p, ranks_ptr="*i32", acts_ptr="*i32", ids_ptr="*i32",
                perm_ptr="*i32"), dict(
                SORTED=p.sort_rows, HAS_BIAS=True, HAS_AB=True, HAS_BB=True, HAS_SCALES=True, HAS_RANKS=True,
                HAS_ACTS=True, STORE_Z=True, **acc, BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=p.block_k,
                BLOCK_R=p.block_r, GROUP_M=8), (p.num_warps, p.num_stages)
        for m in (1, 1024):
            c = config.onepass_config(m, 4096, 64, elem)
            yield f"onepass-table-M{m}-R64", K._onepass_fwd_kernel, dict(
                y_ptr=ptr, z_ptr=acc_p, x_ptr=ptr, w_ptr=ptr, bias_ptr=ptr, aw_ptr=ptr, ab_ptr=ptr, bw_ptr=ptr,
                bb_ptr=ptr, seed_ptr="*i64"), dict(
                HAS_BIAS=True, HAS_AB=True, HAS_BB=True, STORE_Z=True, ACT=2, DROPOUT=False, **acc,
                BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_R=64, GROUP_M=c.group_m), \
                (c.num_warps, c.num_stages)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    count = 0
    fixed = ((n, f, p, c, (w, 3)) for n, f, p, c, w in variants())
    for name, fn, ptrs, consts, (warps, stages) in itertools.chain(fixed, table_variants()):
        label = f"{name} " + " ".join(f"{k}={v}" for k, v in consts.items() if "table" in name
                                      or not k.startswith("BLOCK"))
        try:
            shared = compile_variant(fn, ptrs, consts, args.arch, num_warps=warps, num_stages=stages)
        except Exception as exc:  # report the variant, then fail
            print(f"FAIL {label}\n{type(exc).__name__}: {exc}")
            return 1
        if "table" in name and shared > SMEM_LIMIT:
            print(f"FAIL {label}: needs {shared} B of shared memory, more than the {SMEM_LIMIT} B of sm_90")
            return 1
        count += 1
        print(f"ok   {label} (shared {shared} B)")
    print(f"{count} variants compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

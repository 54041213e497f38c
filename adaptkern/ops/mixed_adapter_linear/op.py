"""Mixed-adapter linear: launchers → ``adaptkern::mixed_adapter_linear`` custom op → autograd.

Semantics (row i, s = ids[i]; ``-1``: base only)::

    z_i = x_i·A_s[:r_s]ᵀ + a_s,   y_i = x_i·Wᵀ + b + scale_s·(f_s(z_i)·B_s[:, :r_s]ᵀ + c_s)

Backward, per slot over the rows that used it (so each adapter gets exactly the gradient
of its rows)::

    dZ_i = scale_s·(dY_i·B_s) ⊙ f_s'(z_i)        dX_i = dY_i·W + dZ_i·A_s
    dA_s = Σ dZ_iᵀ·x_i,  da_s = Σ dZ_i          dB_s = scale_s·Σ dY_iᵀ·f_s(z_i),  dc_s = scale_s·Σ dY_i

Two launches forward (shrink, then base GEMM + per-slot epilogue), plus the row sort above
``config.MIXED_SORT_MIN_M`` rows. One launch for decode was the first plan; recomputing
``x·A_sᵀ`` in every N tile would re-read every adapter's A N/BLOCK_N times (32× at N=4096),
so the shrink stays a launch of its own. Nothing syncs with the host: the sort, the
per-slot offsets and every kernel read the ids on the device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from .. import common, config
from ..common import acc_dtype, dot_flags, elem_size, use_triton, vectors
from ..gemm import gemm
from . import reference
from .kernels import (_mixed_adapter_linear_kernel, _mixed_adapter_linear_segment_kernel,
                      _mixed_adapter_linear_shrink_kernel)
from .rows import align_rows, align_rows_reference


class SlotStack(NamedTuple):
    """Stacked adapter slots as the mixed op reads them (one slot per adapter id).

    Shapes: down_weight [S, R_max, K], down_bias [S, R_max] | None, up_weight [S, N, R_max],
    up_bias [S, N] | None, scales [S] float32 (float64 for float64 x), ranks [S] int32 (slot
    s uses columns [0, ranks[s]); 0: base only), acts [S] int32 activation codes | None (all
    identity).
    """

    down_weight: Tensor
    down_bias: Optional[Tensor]
    up_weight: Tensor
    up_bias: Optional[Tensor]
    scales: Tensor
    ranks: Tensor
    acts: Optional[Tensor]


def _sorted_rows(ids: Tensor, num_slots: int) -> Tensor:
    """Row indices grouped by slot (slots 0..S-1, then base-only rows): a counting sort.

    Under ``torch.use_deterministic_algorithms`` the stable PyTorch version runs, so that
    backward's per-slot sums add rows in a fixed order (the CUDA op's order within a slot
    follows its atomics).
    """
    align = align_rows_reference if torch.are_deterministic_algorithms_enabled() else align_rows
    return align(ids, num_slots, 1).sorted_rows


def _slot_offsets(ids: Tensor, num_slots: int) -> Tensor:
    """[S + 1] int32: slot s owns positions [offsets[s], offsets[s+1]) of the sorted rows."""
    counts = torch.zeros(num_slots + 1, dtype=torch.int32, device=ids.device)
    bins = torch.where((ids < 0) | (ids >= num_slots), num_slots, ids).long()  # out of range: base only
    counts.scatter_add_(0, bins, torch.ones_like(ids, dtype=torch.int32))
    return torch.cat([counts.new_zeros(1), counts[:num_slots].cumsum(0, dtype=torch.int32)])


def _shrink(x, a_view, ids, ranks, perm, plan, r):
    """Partials [SPLIT, M, R] of x_i·A_sᵀ; a_view [S, R, K] with any strides."""
    m, k = x.shape
    s_count = a_view.shape[0]
    split = plan.split
    parts = torch.empty((split, m, r), dtype=acc_dtype(x.dtype), device=x.device)
    bm = plan.shrink_block_m or plan.block_m  # thin output: its own tiles (docs/compiled-code.md)
    bk = plan.shrink_block_k or plan.block_k
    grid = (triton.cdiv(m, bm), split, triton.cdiv(r, plan.block_r))
    _mixed_adapter_linear_shrink_kernel[grid](
        parts, x, a_view, ids, perm if perm is not None else ids, ranks if ranks is not None else ids,
        m, k, r, s_count, triton.cdiv(triton.cdiv(k, split), bk) * bk,
        *x.stride(), *a_view.stride(),
        SORTED=perm is not None, HAS_RANKS=ranks is not None, **dot_flags(x.dtype),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=plan.block_r,
        num_warps=plan.shrink_warps or plan.num_warps, num_stages=plan.shrink_stages or plan.num_stages,
    )
    return parts


def _linear(y, x, weight, bias, parts, a_bias, b_view, b_bias, scales, ranks, acts, ids, perm, plan, z=None):
    """y = x·Wᵀ + b + per-slot epilogue on the summed partials; b_view [S, N, R] any strides."""
    m, k = x.shape
    n = weight.shape[0]
    r = parts.shape[2]
    dummy = y
    grid = (triton.cdiv(m, plan.block_m) * triton.cdiv(n, plan.block_n),)
    _mixed_adapter_linear_kernel[grid](
        y, z if z is not None else dummy, x, weight, bias if bias is not None else dummy, parts,
        a_bias if a_bias is not None else dummy, b_view, b_bias if b_bias is not None else dummy,
        scales if scales is not None else dummy, ranks if ranks is not None else ids,
        acts if acts is not None else ids, ids, perm if perm is not None else ids,
        m, n, k, r, b_view.shape[0], parts.shape[0],
        *y.stride(), *x.stride(), *weight.stride(),
        *(a_bias.stride() if a_bias is not None else (0, 0)), *b_view.stride(),
        *(b_bias.stride() if b_bias is not None else (0, 0)),
        SORTED=perm is not None, HAS_BIAS=bias is not None, HAS_AB=a_bias is not None, HAS_BB=b_bias is not None,
        HAS_SCALES=scales is not None, HAS_RANKS=ranks is not None, HAS_ACTS=acts is not None,
        STORE_Z=z is not None, **dot_flags(x.dtype),
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, BLOCK_R=plan.block_r, GROUP_M=8,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return y


def _segment_gemm(p, q, perm, offsets, scales, num_slots, dtype):
    """out[s] = scales[s]·Σ_{rows of s} p[row]ᵀ ⊗ q[row]: [S, P_COLS, Q_COLS], dots in ``dtype``.

    A slot's rows are split across programs (fp32 atomics) when S × tiles leaves the GPU
    idle, e.g. one slot over 8192 rows; never under deterministic algorithms.
    """
    pc, qc = p.shape[1], q.shape[1]
    cfg = config.gemm_config(pc, qc, elem_size(dot_flags(dtype)))
    tiles = triton.cdiv(pc, cfg.block_m) * triton.cdiv(qc, cfg.block_n)
    split = config.split_k(num_slots * tiles, p.shape[0] // num_slots, cfg.block_k, p.device)
    alloc = torch.zeros if split > 1 else torch.empty
    out = alloc((num_slots, pc, qc), dtype=acc_dtype(dtype), device=p.device)
    grid = (num_slots * split, triton.cdiv(pc, cfg.block_m), triton.cdiv(qc, cfg.block_n))
    _mixed_adapter_linear_segment_kernel[grid](
        out, p, q, perm, offsets, scales if scales is not None else offsets, pc, qc,
        *p.stride(), *q.stride(), HAS_SCALES=scales is not None, SPLIT=split, **dot_flags(dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _forward_triton(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, need_z):
    bias, scales, ranks, acts, ids = vectors(bias, scales, ranks, acts, ids)
    m, k = x.shape
    s_count, r, _ = a_all.shape
    y = x.new_empty((m, weight.shape[0]))
    z = torch.zeros((m, r) if need_z else (0,), dtype=acc_dtype(x.dtype), device=x.device)
    if m == 0:
        return y, z
    plan = config.mixed_plan(m, k, r, elem_size(dot_flags(x.dtype)), device=x.device)
    perm = _sorted_rows(ids, s_count) if plan.sort_rows else None
    parts = _shrink(x, a_all, ids, ranks, perm, plan, r)
    _linear(y, x, weight, bias, parts, a_bias, b_all, b_bias, scales, ranks, acts, ids, perm, plan,
            z if need_z else None)
    return y, z


def _per_row_activation(z, acts, slot, grad: bool):
    """f_s(z_i) (or f_s'(z_i)) with each row's slot's activation; identity when acts is None."""
    fn = common.activation_grad if grad else common.activation
    if acts is None:
        return fn(z, "identity")
    codes = acts.long()[slot]
    out = torch.zeros_like(z)
    for code, name in enumerate(common.ACTIVATIONS):  # a fixed, small loop: no host sync
        out = torch.where((codes == code)[:, None], fn(z, name), out)
    return out


def _backward_triton(dy, x, weight, a_all, a_bias, b_all, scales, ranks, acts, ids, z, needs):
    scales, ranks, acts, ids = vectors(scales, ranks, acts, ids)
    m, k = x.shape
    s_count, r, _ = a_all.shape
    need_x, need_w, need_b, need_aw, need_ab, need_bw, need_bb = needs
    acc = acc_dtype(x.dtype)
    used = ((ids >= 0) & (ids < s_count))[:, None]  # other ids are base-only rows, as in forward
    slot = torch.where(used[:, 0], ids, 0).long()  # an index in range for every row; `used` masks the rest
    perm = _sorted_rows(ids, s_count)
    offsets = _slot_offsets(ids, s_count)
    plan = config.mixed_plan(m, max(k, weight.shape[0]), r, elem_size(dot_flags(x.dtype)), device=x.device)
    dx = dw = daw = dab = dbw = dbb = None
    dz = None
    if need_x or need_aw or need_ab:
        ds = _shrink(dy, b_all.transpose(1, 2), ids, ranks, perm if plan.sort_rows else None, plan, r).sum(0)
        dz = torch.where(used, ds * scales.to(acc)[slot][:, None] * _per_row_activation(z, acts, slot, grad=True), 0.0)
    if need_x:
        dx = x.new_empty((m, k))
        _linear(dx, dy, weight.t(), None, dz[None], None, a_all.transpose(1, 2), None, None, ranks, None, ids,
                perm if plan.sort_rows else None, plan)
    if need_w:
        dw = gemm(torch.empty(weight.shape, dtype=acc, device=x.device), dy.t(), x, dot_dtype=dot_flags(x.dtype),
                  allow_split_k=True)
    if need_aw:
        daw = _segment_gemm(dz, x, perm, offsets, None, s_count, x.dtype)
    if need_ab:
        dab = torch.zeros((s_count, r), dtype=acc, device=x.device).index_add_(0, slot, dz)
    # A slot no row uses gets exact zeros, not 0·scale (NaN for a non-finite scale).
    used_scales = torch.where(offsets[1:] > offsets[:-1], scales.to(acc), 0.0)
    if need_bw:
        s_act = torch.where(used, _per_row_activation(z, acts, slot, grad=False), 0.0)
        dbw = _segment_gemm(dy, s_act, perm, offsets, used_scales, s_count, x.dtype)
    if need_bb:
        dbb = torch.zeros((s_count, dy.shape[1]), dtype=acc, device=x.device)
        dbb.index_add_(0, slot, torch.where(used, dy.to(acc), 0.0)).mul_(used_scales[:, None])
    return dx, dw, dy.sum(0, dtype=acc) if need_b else None, daw, dab, dbw, dbb


@torch.library.custom_op("adaptkern::mixed_adapter_linear", mutates_args=())
def mixed_adapter_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], a_all: Tensor, a_bias: Optional[Tensor], b_all: Tensor,
    b_bias: Optional[Tensor], scales: Tensor, ranks: Optional[Tensor], acts: Optional[Tensor], ids: Tensor,
    need_z: bool,
) -> tuple[Tensor, Tensor]:
    """Semantics: see the module docstring. Returns (y [M, N], z [M, R] (fp32; fp64 for fp64 x) or [0]):
    z_i = x_i·A_sᵀ + a_s in a row's first r_s columns, zeros elsewhere, on every path.

    Shapes: x [M, K], weight [N, K], bias [N], a_all [S, R, K], a_bias [S, R], b_all [S, N, R],
    b_bias [S, N], scales [S] fp32 (fp64 for fp64 x), ranks [S] int32, acts [S] int32, ids [M] int32/int64.
    Inputs are validated by ``adaptkern.mixed`` (ids included); this op trusts them.
    """
    if use_triton(x):
        return _forward_triton(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, need_z)
    return reference.mixed_adapter_linear_forward(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts,
                                                  ids, need_z)


@mixed_adapter_linear_op.register_fake
def _(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, need_z):
    m, r = x.shape[0], a_all.shape[1]
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, r) if need_z else (0,), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("adaptkern::mixed_adapter_linear_backward", mutates_args=())
def mixed_adapter_linear_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], a_all: Tensor, a_bias: Optional[Tensor],
    b_all: Tensor, b_bias: Optional[Tensor], scales: Tensor, ranks: Optional[Tensor], acts: Optional[Tensor],
    ids: Tensor, z: Tensor, needs: list[bool],
) -> list[Tensor]:
    """Gradients for (x, weight, bias, a_all, a_bias, b_all, b_bias), each in its input's dtype;
    an input whose entry of ``needs`` is False gets an empty tensor."""
    if use_triton(x):
        grads = _backward_triton(dy, x, weight, a_all, a_bias, b_all, scales, ranks, acts, ids, z, needs)
    else:
        grads = reference.mixed_adapter_linear_backward(dy, x, weight, a_all, a_bias, b_all, scales, ranks, acts, ids,
                                                        needs)
    refs = (x, weight, bias, a_all, a_bias, b_all, b_bias)
    return [g.to(t.dtype) if g is not None else x.new_empty(0) for g, t in zip(grads, refs)]


@mixed_adapter_linear_backward_op.register_fake
def _(dy, x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, z, needs):
    refs = (x, weight, bias, a_all, a_bias, b_all, b_bias)
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(refs, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, need_z = inputs
    ctx.save_for_backward(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, output[1])


def _backward(ctx, dy, _dz):
    x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, z = ctx.saved_tensors
    present = (x, weight, bias, a_all, a_bias, b_all, b_bias)
    needs = [bool(ctx.needs_input_grad[i] and t is not None) for i, t in enumerate(present)]
    if not any(needs):
        return (None,) * 12
    if use_triton(x) and z.numel() == 0 and x.shape[0] > 0:
        raise RuntimeError("adaptkern::mixed_adapter_linear was run with need_z=False; it cannot be differentiated")
    grads = mixed_adapter_linear_backward_op(dy, x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts,
                                             ids, z, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None, None)

mixed_adapter_linear_op.register_autograd(_backward, setup_context=_setup_context)

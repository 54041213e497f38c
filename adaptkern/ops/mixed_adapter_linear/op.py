"""Mixed-adapter linear: launchers → ``adaptkern::mixed_adapter_linear`` custom op → autograd.

Semantics (row i, s = ids[i]; ``-1``: base only)::

    z_i = x_i·A_s[:r_s]ᵀ + a_s,   y_i = x_i·Wᵀ + b + scale_s·(f_s(z_i)·B_s[:, :r_s]ᵀ + c_s)

With per-slot column scales G [S, N] (DoRA slots: g_s = m_s / ‖W + s_s·B_s·A_s‖_row, precomputed;
ones for the other slots) all but the bias is scaled, y_i = G_s ⊙ (x_i·Wᵀ + scale_s·(…)) + b (rows
without a slot: ·1), and backward runs on dY_i ⊙ G_s (db on dY). G is a constant: no gradient.

Backward, per slot over the rows that used it (so each adapter gets exactly the gradient
of its rows)::

    dZ_i = scale_s·(dY_i·B_s) ⊙ f_s'(z_i)        dX_i = dY_i·W + dZ_i·A_s
    dA_s = Σ dZ_iᵀ·x_i,  da_s = Σ dZ_i          dB_s = scale_s·Σ dY_iᵀ·f_s(z_i),  dc_s = scale_s·Σ dY_i

With output slices (one LoRA per slice of a packed projection: a_all and b_all are lists, slice i
owns y's columns [N_0 + … + N_{i-1}, … + N_i)) every slice runs in the same two launches; backward
adds one shrink and two segment launches per slice, and dX = dY·W + Σ_i dZ_i·A_i stays one launch.

Two launches forward (shrink, then per-slot adapter part + base GEMM), plus the row sort above
``config.MIXED_SORT_MIN_M`` rows. One launch for decode was the first plan; recomputing
``x·A_sᵀ`` in every N tile would re-read every adapter's A N/BLOCK_N times (32× at N=4096),
so the shrink stays a launch of its own. Nothing syncs with the host: the slot metadata
(``rows.py``, or a caller's ``SlotMapping``) and every kernel read the ids on the device.
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
from . import rows
from .kernels import (_mixed_adapter_linear_kernel, _mixed_adapter_linear_segment_kernel,
                      _mixed_adapter_linear_shrink_kernel)


class SlotStack(NamedTuple):
    """Stacked adapter slots as the mixed op reads them (one slot per adapter id).

    Shapes: down_weight [S, R_max, K], down_bias [S, R_max] | None, up_weight [S, N, R_max],
    up_bias [S, N] | None, scales [S] float32 (float64 for float64 x), ranks [S] int32 (slot
    s uses columns [0, ranks[s]); 0: base only), acts [S] int32 activation codes | None (all
    identity), col_scales [S, N] in the scales' dtype | None (DoRA slots' g_s; ones elsewhere).
    """

    down_weight: Tensor
    down_bias: Optional[Tensor]
    up_weight: Tensor
    up_bias: Optional[Tensor]
    scales: Tensor
    ranks: Tensor
    acts: Optional[Tensor]
    col_scales: Optional[Tensor] = None


def sort_metadata(ids: Tensor, num_slots: int, sorted_rows: Optional[Tensor], offsets: Optional[Tensor]):
    """(sorted_rows [M], offsets [S + 1]): the caller's (a ``SlotMapping``'s), else built here."""
    if sorted_rows is not None and offsets is not None:
        return sorted_rows, offsets
    meta = rows.slot_metadata(ids, num_slots)
    return meta.sorted_rows, meta.offsets


def _flat_strides(ts):
    return tuple(st for t in ts for st in t.stride())


def launch_shrink(x, a_views, ids, ranks, perm, plan, *, scales=None, out=None):
    """x_i·A_{i,s}ᵀ for every slice i: partials [NS, SPLIT, M, R] (fp32), or with ``out`` [NS, M, R]
    (one split, scaled by scales[s] when given) written in place. a_views: NS × [S, R, K], any strides."""
    m, k = x.shape
    s_count, r, _ = a_views[0].shape
    split = 1 if out is not None else plan.split
    if out is None:
        out = torch.empty((len(a_views), split, m, r), dtype=acc_dtype(x.dtype), device=x.device)
        p_strides = out.stride()
    else:
        p_strides = (out.stride(0), 0, out.stride(1), out.stride(2))
    bm = plan.shrink_block_m or plan.block_m  # thin output: its own tiles (docs/compiled-code.md)
    bk = plan.shrink_block_k or plan.block_k
    grid = (triton.cdiv(m, bm), split, triton.cdiv(r, plan.block_r))
    _mixed_adapter_linear_shrink_kernel[grid](
        out, x, tuple(a_views), ids, perm if perm is not None else ids, ranks if ranks is not None else ids,
        scales if scales is not None else out,
        m, k, r, s_count, triton.cdiv(triton.cdiv(k, split), bk) * bk,
        *x.stride(), _flat_strides(a_views), *p_strides,
        NS=len(a_views), SORTED=perm is not None, HAS_RANKS=ranks is not None, SCALE=scales is not None,
        **dot_flags(x.dtype), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=plan.block_r,
        num_warps=plan.shrink_warps or plan.num_warps, num_stages=plan.shrink_stages or plan.num_stages,
    )
    return out


def launch_linear(y, x, weight, bias, parts, b_views, ids, perm, plan, *, a_bias=None, b_bias=None, scales=None,
                  ranks=None, acts=None, z=None, cols=None, add=False, a_views=None, col_scales=None):
    """y (=|+=) x·Wᵀ + b + per slot and slice scale_s·(f_s(z)·B_{i,s}ᵀ + c_s), y [M, N] written once;
    with ``col_scales`` G [S, N] (ACC dtype; needs the base GEMM, not ``add``) y_i = G_s ⊙ (… all but b) + b.

    parts: [NS, SPLIT, M, R] fp32 z partials (unit stride in R), or None with ``a_views`` (z = x·A_{i,s}ᵀ
    recomputed per slot in the kernel); weight None: no base GEMM (x is then only read for the recompute);
    b_views: NS × [S, N_i, R] any strides; cols: (starts, widths) of the slices in y's columns
    (default: one after another).
    """
    m, n = y.shape
    k = x.shape[1]
    ns = len(b_views)
    r = b_views[0].shape[2]
    if cols is None:
        widths = tuple(b.shape[1] for b in b_views)
        cols = (tuple(sum(widths[:i]) for i in range(ns)), widths)
    if col_scales is not None and (weight is None or add):
        raise ValueError("col_scales scale the base GEMM's output: they need weight and add=False")
    dummy = y
    p_strides = parts.stride()[:3] if parts is not None else (0, 0, 0)
    fused = parts is None
    if weight is None and not fused and plan.expand_block_m:  # the expand alone: its own tiles
        plan = plan._replace(block_m=plan.expand_block_m, block_n=plan.expand_block_n, num_warps=plan.expand_warps)
    grid = (triton.cdiv(m, plan.block_m) * triton.cdiv(n, plan.block_n),)
    _mixed_adapter_linear_kernel[grid](
        y, z if z is not None else dummy, x, weight if weight is not None else dummy,
        bias if bias is not None else dummy, parts if parts is not None else dummy,
        tuple(a_views) if fused else (dummy,) * ns, a_bias if a_bias is not None else dummy, tuple(b_views),
        b_bias if b_bias is not None else dummy, scales if scales is not None else dummy,
        ranks if ranks is not None else ids, acts if acts is not None else ids, ids,
        perm if perm is not None else ids, col_scales if col_scales is not None else dummy,
        m, n, k, r, b_views[0].shape[0], parts.shape[1] if parts is not None else 1, *cols,
        *y.stride(), *x.stride(), *(weight.stride() if weight is not None else (0, 0)), *p_strides,
        _flat_strides(a_views) if fused else (0, 0, 0) * ns,
        *(a_bias.stride() if a_bias is not None else (0, 0)), _flat_strides(b_views),
        *(b_bias.stride() if b_bias is not None else (0, 0)), col_scales.stride(0) if col_scales is not None else 0,
        NS=ns, BASE=weight is not None, ADD=add, FUSED_SHRINK=fused, SORTED=perm is not None,
        HAS_BIAS=bias is not None, HAS_AB=a_bias is not None, HAS_BB=b_bias is not None,
        HAS_SCALES=scales is not None, HAS_RANKS=ranks is not None, HAS_ACTS=acts is not None,
        STORE_Z=z is not None, HAS_COL_SCALE=col_scales is not None, **dot_flags(x.dtype),
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, BLOCK_R=plan.block_r,
        R_TILES=triton.cdiv(r, plan.block_r), GROUP_M=8,
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


def _forward_triton(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, sorted_rows, need_z,
                    col_scales):
    bias, scales, ranks, acts, ids, col_scales = vectors(bias, scales, ranks, acts, ids, col_scales)
    m, k = x.shape
    s_count, r, _ = a_all[0].shape
    y = x.new_empty((m, weight.shape[0]))
    z = torch.zeros((len(a_all), m, r) if need_z else (0,), dtype=acc_dtype(x.dtype), device=x.device)
    if m == 0:
        return y, z
    plan = config.mixed_plan(m, k, r, elem_size(dot_flags(x.dtype)), device=x.device)
    perm = None
    if plan.sort_rows:
        perm = sorted_rows if sorted_rows is not None else rows.slot_metadata(ids, s_count).sorted_rows
    parts = launch_shrink(x, a_all, ids, ranks, perm, plan)
    launch_linear(y, x, weight, bias, parts, b_all, ids, perm, plan, a_bias=a_bias, b_bias=b_bias, scales=scales,
                  ranks=ranks, acts=acts, z=z if need_z else None, col_scales=col_scales)
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


def _backward_triton(dy, x, weight, a_all, a_bias, b_all, scales, ranks, acts, ids, sorted_rows, offsets, z, needs):
    scales, ranks, acts, ids = vectors(scales, ranks, acts, ids)
    m, k = x.shape
    s_count, r, _ = a_all[0].shape
    need_x, need_w, need_b, need_aw, need_ab, need_bw, need_bb = needs
    acc = acc_dtype(x.dtype)
    used = ((ids >= 0) & (ids < s_count))[:, None]  # other ids are base-only rows, as in forward
    slot = torch.where(used[:, 0], ids, 0).long()  # an index in range for every row; `used` masks the rest
    perm, offsets = sort_metadata(ids, s_count, sorted_rows, offsets)
    plan = config.mixed_plan(m, max(k, weight.shape[0]), r, elem_size(dot_flags(x.dtype)), device=x.device)
    plan_perm = perm if plan.sort_rows else None
    starts = [sum(b.shape[1] for b in b_all[:i]) for i in range(len(b_all))]
    dys = [dy.narrow(1, o, b.shape[1]) for o, b in zip(starts, b_all)]  # dY of each slice's columns
    dx = dw = dab = dbb = None
    daw, dbw = [None] * len(a_all), [None] * len(b_all)
    dz = None
    if need_x or need_aw or need_ab:
        dz = torch.stack([
            torch.where(used, launch_shrink(dyi, [b.transpose(1, 2)], ids, ranks, plan_perm, plan)[0].sum(0)
                        * scales.to(acc)[slot][:, None] * _per_row_activation(zi, acts, slot, grad=True), 0.0)
            for dyi, b, zi in zip(dys, b_all, z)])  # [NS, M, R]
    if need_x:  # dX = dY·W + Σ_i dZ_i·A_i: every slice spans all K columns of dX
        dx = x.new_empty((m, k))
        launch_linear(dx, dy, weight.t(), None, dz[:, None], [a.transpose(1, 2) for a in a_all], ids, plan_perm,
                      plan, ranks=ranks, cols=((0,) * len(a_all), (k,) * len(a_all)))
    if need_w:
        dw = gemm(torch.empty(weight.shape, dtype=acc, device=x.device), dy.t(), x, dot_dtype=dot_flags(x.dtype),
                  allow_split_k=True)
    if need_aw:
        daw = [_segment_gemm(dzi, x, perm, offsets, None, s_count, x.dtype) for dzi in dz]
    if need_ab:
        dab = torch.zeros((s_count, r), dtype=acc, device=x.device).index_add_(0, slot, dz[0])
    # A slot no row uses gets exact zeros, not 0·scale (NaN for a non-finite scale).
    used_scales = torch.where(offsets[1:] > offsets[:-1], scales.to(acc), 0.0)
    if need_bw:
        daw_act = [torch.where(used, _per_row_activation(zi, acts, slot, grad=False), 0.0) for zi in z]
        dbw = [_segment_gemm(dyi, si, perm, offsets, used_scales, s_count, x.dtype) for dyi, si in zip(dys, daw_act)]
    if need_bb:
        dbb = torch.zeros((s_count, dy.shape[1]), dtype=acc, device=x.device)
        dbb.index_add_(0, slot, torch.where(used, dy.to(acc), 0.0)).mul_(used_scales[:, None])
    return dx, dw, dy.sum(0, dtype=acc) if need_b else None, daw, dab, dbw, dbb


@torch.library.custom_op("adaptkern::mixed_adapter_linear", mutates_args=())
def mixed_adapter_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], a_all: list[Tensor], a_bias: Optional[Tensor],
    b_all: list[Tensor], b_bias: Optional[Tensor], scales: Tensor, ranks: Optional[Tensor], acts: Optional[Tensor],
    ids: Tensor, sorted_rows: Optional[Tensor], offsets: Optional[Tensor], need_z: bool, col_scales: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Semantics: see the module docstring. Returns (y [M, N], z [NS, M, R] (fp32; fp64 for fp64 x) or [0]):
    z[i, m] = x_m·A_{i,s}ᵀ + a_s in a row's first r_s columns, zeros elsewhere, on every path.

    Shapes: x [M, K], weight [N, K], bias [N], a_all NS × [S, R, K], a_bias [S, R], b_all NS × [S, N_i, R]
    (ΣN_i = N; slice i owns columns [N_0 + … + N_{i-1}, … + N_i)), b_bias [S, N], scales [S] fp32 (fp64 for
    fp64 x), ranks [S] int32, acts [S] int32, ids [M] int32/int64; a_bias, b_bias and acts only with one slice;
    col_scales [S, N] (scales' dtype) | None: y_i = G_s ⊙ (all but b) + b, see the module docstring.
    sorted_rows [M] and offsets [S + 1] (both or neither): the slot metadata of ids (``rows.py``), else built
    here. Inputs are validated by ``adaptkern.mixed`` (ids included); this op trusts them.
    """
    if use_triton(x):
        return _forward_triton(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, sorted_rows,
                               need_z, col_scales)
    return reference.mixed_adapter_linear_forward(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts,
                                                  ids, need_z, col_scales)


@mixed_adapter_linear_op.register_fake
def _(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, sorted_rows, offsets, need_z,
      col_scales):
    m, r = x.shape[0], a_all[0].shape[1]
    return (x.new_empty((m, weight.shape[0])),
            x.new_empty((len(a_all), m, r) if need_z else (0,), dtype=acc_dtype(x.dtype)))


@torch.library.custom_op("adaptkern::mixed_adapter_linear_backward", mutates_args=())
def mixed_adapter_linear_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], a_all: list[Tensor], a_bias: Optional[Tensor],
    b_all: list[Tensor], b_bias: Optional[Tensor], scales: Tensor, ranks: Optional[Tensor], acts: Optional[Tensor],
    ids: Tensor, sorted_rows: Optional[Tensor], offsets: Optional[Tensor], z: Tensor, needs: list[bool],
    col_scales: Optional[Tensor],
) -> list[Tensor]:
    """Gradients [dx, dweight, dbias, *da_all (NS), da_bias, *db_all (NS), db_bias], each in its input's
    dtype; an input whose entry of ``needs`` (x, weight, bias, a_all, a_bias, b_all, b_bias) is False
    gets an empty tensor (every slice of a_all / b_all). With col_scales G: the gradients of dY_i ⊙ G_s,
    dbias = ΣdY."""
    inner = list(needs)
    if col_scales is not None:  # db from dY itself, every other gradient from dY ⊙ G
        inner[2] = False
        db = dy.sum(0, dtype=acc_dtype(x.dtype))
        dy = reference.scale_rows(dy.to(col_scales.dtype), col_scales, ids).to(dy.dtype)
    if use_triton(x):
        grads = _backward_triton(dy, x, weight, a_all, a_bias, b_all, scales, ranks, acts, ids, sorted_rows, offsets,
                                 z, inner)
    else:
        grads = reference.mixed_adapter_linear_backward(dy, x, weight, a_all, a_bias, b_all, scales, ranks, acts, ids,
                                                        inner)
    if col_scales is not None and needs[2]:
        grads = (*grads[:2], db, *grads[3:])
    return [g.to(t.dtype) if g is not None else x.new_empty(0) for g, t in zip(_flat(grads), _flat_inputs(
        x, weight, bias, a_all, a_bias, b_all, b_bias))]


def _flat(grads):
    dx, dw, db, daw, dab, dbw, dbb = grads
    return [dx, dw, db, *daw, dab, *dbw, dbb]


def _flat_inputs(x, weight, bias, a_all, a_bias, b_all, b_bias):
    return [x, weight, bias, *a_all, a_bias, *b_all, b_bias]


def _flat_needs(needs, ns):
    return [needs[0], needs[1], needs[2], *[needs[3]] * ns, needs[4], *[needs[5]] * ns, needs[6]]


@mixed_adapter_linear_backward_op.register_fake
def _(dy, x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, sorted_rows, offsets, z, needs,
      col_scales):
    refs = _flat_inputs(x, weight, bias, a_all, a_bias, b_all, b_bias)
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(refs, _flat_needs(needs, len(a_all)))]


def _setup_context(ctx, inputs, output):
    x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, sorted_rows, offsets, need_z, \
        col_scales = inputs
    ctx.num_slices = len(a_all)
    ctx.save_for_backward(x, weight, bias, a_bias, b_bias, scales, ranks, acts, ids, sorted_rows, offsets, output[1],
                          col_scales, *a_all, *b_all)


def _backward(ctx, dy, _dz):
    x, weight, bias, a_bias, b_bias, scales, ranks, acts, ids, sorted_rows, offsets, z, col_scales, *ab = \
        ctx.saved_tensors
    ns = ctx.num_slices
    a_all, b_all = ab[:ns], ab[ns:]
    # needs_input_grad mirrors the inputs: a list of bools for a_all and b_all
    present = (x, weight, bias, a_all, a_bias, b_all, b_bias)
    needs = [any(need) if isinstance(need, (list, tuple)) else bool(need and t is not None)
             for need, t in zip(ctx.needs_input_grad[:7], present)]
    if not any(needs):  # the structure of the inputs: a list of gradients for each list input
        return (None, None, None, [None] * ns, None, [None] * ns, None) + (None,) * 8
    if use_triton(x) and z.numel() == 0 and x.shape[0] > 0:
        raise RuntimeError("adaptkern::mixed_adapter_linear was run with need_z=False; it cannot be differentiated")
    flat = mixed_adapter_linear_backward_op(dy, x, weight, bias, list(a_all), a_bias, list(b_all), b_bias, scales,
                                            ranks, acts, ids, sorted_rows, offsets, z, needs, col_scales)
    dx, dw, db = flat[:3]
    daw, dab, dbw, dbb = flat[3:3 + ns], flat[3 + ns], flat[4 + ns:4 + 2 * ns], flat[4 + 2 * ns]
    pick = lambda g, need: g if need else None  # noqa: E731
    return (pick(dx, needs[0]), pick(dw, needs[1]), pick(db, needs[2]),
            list(daw) if needs[3] else [None] * ns, pick(dab, needs[4]), list(dbw) if needs[5] else [None] * ns,
            pick(dbb, needs[6]), None, None, None, None, None, None, None, None)


mixed_adapter_linear_op.register_autograd(_backward, setup_context=_setup_context)

"""PyTorch reference for the fused adapter linear: the spec, the CPU path and the test oracle.

Every adapter adaptkern runs is one formula (DESIGN §1)::

    z = x·Aᵀ + a                      [M, R]   (x after dropout, when dropout is on)
    y = x·Wᵀ + b + s·(f(z)·Bᵀ + c)    [M, N]

LoRA is ``A = lora_A, B = lora_B, f = identity``; a parallel bottleneck is
``A = down.weight, a = down.bias``; a sequential (Houlsby/Pfeiffer) bottleneck folds its
down-projection through the frozen layer: ``A = D·W, a = D·b + d`` (see :func:`fold_sequential`).

The ``*_ref`` functions compute in the dtype of their inputs (pass float64 tensors for an
oracle); :func:`adapter_linear_forward` and :func:`adapter_linear_backward` are what CPU
tensors run when the Triton interpreter is off, computed in float32 (float64 for float64
inputs) and cast back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The order is the activation code the kernels and AdapterPool store (code i = ACTIVATIONS[i]).
ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")
_ALIASES = {"swish": "silu", "linear": "identity", "none": "identity", "gelu_new": "gelu_tanh"}
PLACEMENTS = ("sequential", "parallel")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def canonical_activation(name: str) -> str:
    """Return the canonical activation name, resolving aliases ("swish" -> "silu")."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS} (or 'swish')")
    return key


def activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """Semantics: f(z) for f in ACTIVATIONS ("gelu" is the erf form). Shape: any."""
    if name == "identity":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(z: torch.Tensor, name: str) -> torch.Tensor:
    """Semantics: f'(z), elementwise (relu'(0) = 0, as autograd). Shape: any."""
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    if name == "silu":
        sig = torch.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    raise ValueError(f"unknown activation {name!r}")


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device) -> torch.Tensor:
    """The reference path's dropout mask: True where x is kept. Deterministic in ``seed``.

    The Triton kernels draw their own mask from the same seed with Triton's Philox
    stream (``adaptkern.ops.adapter_linear.dropout_mask`` returns it); the two paths
    are each deterministic but do not share a stream, as CPU and CUDA dropout in
    PyTorch do not.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.rand(shape, generator=gen) >= p).to(device)


def adapter_linear_ref(x, weight, bias, a_w, a_b, b_w, b_b, scale=1.0, act="identity", keep=None, dropout_p=0.0):
    """Semantics: y = x·Wᵀ + b + s·(f(x̃·Aᵀ + a)·Bᵀ + c), x̃ = x ⊙ keep / (1 - p).

    Shapes: x [M, K], weight [N, K], bias [N] | None, a_w [R, K], a_b [R] | None,
    b_w [N, R], b_b [N] | None, keep [M, K] bool | None. Returns y [M, N] in x's dtype,
    computed in the inputs' own precision (differentiable: the float64 oracle).
    """
    x_ad = x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)
    z = x_ad @ a_w.t()
    if a_b is not None:
        z = z + a_b
    branch = activation(z, act) @ b_w.t()
    if b_b is not None:
        branch = branch + b_b
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y + scale * branch


def fold_sequential(weight, bias, down_weight, down_bias):
    """Semantics: A = D·W, a = D·b + d, so that h·Dᵀ + d = x·Aᵀ + a for h = x·Wᵀ + b.

    Shapes: weight [N, K], bias [N] | None, down_weight [R, N], down_bias [R] | None ->
    (A [R, K], a [R] | None). Computed in float32 (or float64 for float64 inputs) and
    differentiable, so autograd yields dD = dA·W... and dd = da as DESIGN §1 states.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d32 = down_weight.to(acc)
    a_w = (d32 @ weight.to(acc)).to(down_weight.dtype)
    if bias is None and down_bias is None:
        return a_w, None
    a_b = torch.zeros(d32.shape[0], dtype=acc, device=d32.device)
    if bias is not None:
        a_b = a_b + d32 @ bias.to(acc)
    if down_bias is not None:
        a_b = a_b + down_bias.to(acc)
    return a_w, a_b.to(down_weight.dtype)


def lora_linear_ref(x, weight, bias, lora_a, lora_b, scale=1.0, keep=None, dropout_p=0.0):
    """Semantics: y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ, computed as PEFT's eager layer does."""
    x_ad = x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)
    y = F.linear(x, weight, bias)
    return y + scale * F.linear(F.linear(x_ad, lora_a), lora_b)


def bottleneck_linear_ref(x, weight, bias, down_w, down_b, up_w, up_b, scale=1.0, act="relu", placement="sequential"):
    """Semantics, as AdapterHub computes it (no folding):
    sequential: h = x·Wᵀ + b; y = h + s·(f(h·Dᵀ + d)·Uᵀ + u);
    parallel:   y = x·Wᵀ + b + s·(f(x·Dᵀ + d)·Uᵀ + u).
    """
    h = F.linear(x, weight, bias)
    src = h if placement == "sequential" else x
    return h + scale * F.linear(activation(F.linear(src, down_w, down_b), act), up_w, up_b)


def adapter_linear_forward(x, weight, bias, a_w, a_b, b_w, b_b, scale, act, keep, dropout_p, need_z):
    """The CPU path of ``adaptkern::adapter_linear``: (y [M, N] in x's dtype, z [M, R] fp32 or empty)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    f32 = [None if t is None else t.to(acc) for t in (x, weight, bias, a_w, a_b, b_w, b_b)]
    x32, w32, bias32, aw32, ab32, bw32, bb32 = f32
    x_ad = x32 if keep is None else x32 * keep.to(acc) / (1.0 - dropout_p)
    z = x_ad @ aw32.t()
    if ab32 is not None:
        z = z + ab32
    y = x32 @ w32.t() + scale * (activation(z, act) @ bw32.t())
    if bias32 is not None:
        y = y + bias32
    if bb32 is not None:
        y = y + scale * bb32
    z_out = z if need_z else z.new_empty(0)
    return y.to(x.dtype), z_out


def adapter_linear_backward(dy, x, weight, a_w, b_w, z, scale, act, keep, dropout_p, needs):
    """Explicit gradients of :func:`adapter_linear_ref` (the chain rule the kernels implement).

    dS = s·dY·B;  dZ = dS ⊙ f'(z);  dX = dY·W + (dZ·A) ⊙ keep/(1-p);
    dW = dYᵀ·x;  db = colsum(dY);  dA = dZᵀ·x̃;  da = colsum(dZ);  dB = s·dYᵀ·f(z);  dc = s·colsum(dY).

    Shapes: dy [M, N], x [M, K], weight [N, K], a_w [R, K], b_w [N, R], z [M, R] fp32.
    ``needs`` is (x, weight, bias, a_w, a_b, b_w, b_b). Returns the seven gradients in
    float32, or float64 for float64 inputs (None where not needed).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dy32, x32, w32, aw32, bw32 = (t.to(acc) for t in (dy, x, weight, a_w, b_w))
    need_x, need_w, need_b, need_aw, need_ab, need_bw, need_bb = needs
    scale_keep = None if keep is None else keep.to(acc) / (1.0 - dropout_p)
    x_ad = x32 if scale_keep is None else x32 * scale_keep
    dz = (scale * dy32 @ bw32) * activation_grad(z, act)
    dx = None
    if need_x:
        dx_ad = dz @ aw32
        dx = dy32 @ w32 + (dx_ad if scale_keep is None else dx_ad * scale_keep)
    return (
        dx,
        dy32.t() @ x32 if need_w else None,
        dy32.sum(0) if need_b else None,
        dz.t() @ x_ad if need_aw else None,
        dz.sum(0) if need_ab else None,
        scale * dy32.t() @ activation(z, act) if need_bw else None,
        scale * dy32.sum(0) if need_bb else None,
    )


def _slot_rows(ids, num_slots, ranks, r_max):
    """(slot, rows [n] int64, rank) for every slot in [0, num_slots) that some row names.

    An id outside [0, num_slots) (-1, -2, num_slots, ...) names no slot: its row is base
    only, as in the kernels, which run unchecked ids under torch.compile and graph capture.
    """
    present = sorted(s for s in set(ids.tolist()) if 0 <= s < num_slots)
    return [(s, (ids == s).nonzero().squeeze(1), r_max if ranks is None else int(ranks[s])) for s in present]


def _slot_z(x_rows, a_all, a_bias, s, r):
    """z = x·A_s[:r]ᵀ + a_s[:r] for the rows of slot s: [n, r]."""
    z = x_rows @ a_all[s, :r].t()
    return z if a_bias is None else z + a_bias[s, :r]


def mixed_adapter_linear_ref(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids):
    """Semantics: row i with s = ids[i] in [0, S) gets
    y_i = x_i·Wᵀ + b + scales[s]·(f_s(x_i·A_s[:r_s]ᵀ + a_s[:r_s])·B_s[:, :r_s]ᵀ + c_s); any other id
    (-1, or out of range as the kernels read it): base only.

    Shapes: x [M, K], weight [N, K], bias [N] | None, a_all [S, R, K], a_bias [S, R] | None,
    b_all [S, N, R], b_bias [S, N] | None, scales [S], ranks [S] int | None (None: R),
    acts [S] int activation codes | None (identity), ids [M] int. Computed in the inputs'
    precision, one slot at a time (differentiable: the float64 oracle and the CPU path).
    """
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    rows_out = []
    for s, rows, r in _slot_rows(ids, a_all.shape[0], ranks, a_all.shape[1]):
        act = "identity" if acts is None else ACTIVATIONS[int(acts[s])]
        branch = activation(_slot_z(x[rows], a_all, a_bias, s, r), act) @ b_all[s, :, :r].t()
        if b_bias is not None:
            branch = branch + b_bias[s]
        rows_out.append((rows, scales[s].to(y.dtype) * branch))
    for rows, delta in rows_out:
        y = y.index_add(0, rows, delta)
    return y


def mixed_adapter_linear_forward(x, weight, bias, a_all, a_bias, b_all, b_bias, scales, ranks, acts, ids, need_z):
    """The CPU path of ``adaptkern::mixed_adapter_linear``: (y [M, N] in x's dtype, z).

    z is what the kernels store: [M, R] in float32 (float64 for float64 x), row i holding
    x_i·A_s[:r_s]ᵀ + a_s in its first r_s columns and zeros elsewhere (base-only rows: all
    zeros); [0] when not ``need_z``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32, w32, bias32, a32, ab32, b32, bb32 = (None if t is None else t.to(acc)
                                              for t in (x, weight, bias, a_all, a_bias, b_all, b_bias))
    y = mixed_adapter_linear_ref(x32, w32, bias32, a32, ab32, b32, bb32, scales, ranks, acts, ids).to(x.dtype)
    if not need_z:
        return y, x32.new_empty(0)
    z = x32.new_zeros(x.shape[0], a_all.shape[1])
    for s, rows, r in _slot_rows(ids, a_all.shape[0], ranks, a_all.shape[1]):
        z[rows, :r] = _slot_z(x32[rows], a32, ab32, s, r)
    return y, z


def mixed_adapter_linear_backward(dy, x, weight, a_all, a_bias, b_all, scales, ranks, acts, ids, needs):
    """Explicit gradients of :func:`mixed_adapter_linear_ref` (the CPU path's backward), per slot:

    dZ = scale_s·(dY·B_s) ⊙ f_s'(z);  dX = dY·W + dZ·A_s;  dA_s = dZᵀ·x;  da_s = ΣdZ;
    dB_s = scale_s·dYᵀ·f_s(z);  dc_s = scale_s·ΣdY;  dW = dYᵀ·x;  db = ΣdY (over all rows).

    ``needs`` is (x, weight, bias, a_all, a_bias, b_all, b_bias); returns the seven gradients
    in float32 (float64 for float64 inputs), contiguous, None where not needed.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dy, x, weight, a_all, b_all = (t.to(acc) for t in (dy, x, weight, a_all, b_all))
    a_bias = None if a_bias is None else a_bias.to(acc)
    dx = dy @ weight
    zeros = dict(dtype=acc, device=x.device)
    da_all, dab = torch.zeros(a_all.shape, **zeros), torch.zeros(a_all.shape[:2], **zeros)
    dbw, dbb = torch.zeros(b_all.shape, **zeros), torch.zeros(b_all.shape[:2], **zeros)
    for s, rows, r in _slot_rows(ids, a_all.shape[0], ranks, a_all.shape[1]):
        act = "identity" if acts is None else ACTIVATIONS[int(acts[s])]
        scale = float(scales[s])
        xs, dys = x[rows], dy[rows]
        z = _slot_z(xs, a_all, a_bias, s, r)
        dz = scale * (dys @ b_all[s, :, :r]) * activation_grad(z, act)
        dx[rows] += dz @ a_all[s, :r]
        da_all[s, :r] = dz.t() @ xs
        dab[s, :r] = dz.sum(0)
        dbw[s, :, :r] = scale * dys.t() @ activation(z, act)
        dbb[s] = scale * dys.sum(0)
    grads = (dx, dy.t() @ x, dy.sum(0), da_all, dab, dbw, dbb)
    return tuple(g if need else None for g, need in zip(grads, needs))

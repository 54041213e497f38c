"""PyTorch reference for the fused adapter linear: the spec, the CPU path and the test oracle.

Every adapter adaptkern runs is one formula::

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

import torch

import torch.nn.functional as F

from ..common import activation, activation_grad


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

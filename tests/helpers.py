"""Shared test helpers: input builders and the tolerance rule of DESIGN §6.

A kernel's error against the float64 oracle may be at most 2× the error of eager PyTorch
in the same dtype, plus a small atol relative to the output's magnitude.
"""

import torch

from adaptkern.ops.adapter_linear import reference

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def max_err(out, ref64):
    return (out.double() - ref64).abs().max().item() if out.numel() else 0.0


def assert_close_to_ref(name, out, ref64, eager=None):
    """Assert ``out`` is within 2×(eager error) + atol of ``ref64``; say where and how much if not."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    diff = (out.double() - ref64).abs()
    assert not torch.isnan(diff).any() or torch.isnan(ref64).any(), f"{name}: NaN in output (unwritten element?)"
    eager_err = max_err(eager, ref64) if eager is not None else 0.0
    bound = 2.0 * eager_err + ATOL[out.dtype] * max(1.0, ref64.abs().max().item())
    err = diff.nan_to_num(nan=float("inf")).max().item()
    if err > bound:
        idx = tuple(int(i) for i in torch.unravel_index(diff.nan_to_num(nan=float("inf")).argmax(), diff.shape))
        raise AssertionError(
            f"{name}: max |err| {err:.3e} at {idx} (got {out[idx].item():.6g}, want {ref64[idx].item():.6g}); "
            f"eager {out.dtype} error {eager_err:.3e}; bound {bound:.3e}")


def make_inputs(m, k, n, r, dtype, device="cpu", *, bias=True, adapter_bias=True, seed=0):
    """(x, W, b, A, a, B, c) with magnitudes of a trained layer (outputs O(1))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype=dtype, device=device)

    x = rnd(m, k)
    w = rnd(n, k, std=k**-0.5)
    b = rnd(n, std=0.5) if bias else None
    a_w = rnd(r, k, std=k**-0.5)
    a_b = rnd(r, std=0.5) if adapter_bias else None
    b_w = rnd(n, r, std=r**-0.5)
    b_b = rnd(n, std=0.5) if adapter_bias else None
    return x, w, b, a_w, a_b, b_w, b_b


def eager_and_oracle(fn, inputs, grad_out=None, wrt=()):
    """Run ``fn`` eagerly in the inputs' dtype and in float64.

    Returns (eager_out, oracle_out, eager_grads, oracle_grads) for the inputs at positions ``wrt``.
    """
    results = []
    for cast in (lambda t: t, lambda t: t.double()):
        ins = [None if t is None else cast(t.detach()).requires_grad_(i in wrt) for i, t in enumerate(inputs)]
        out = fn(*ins)
        grads = ()
        if grad_out is not None and wrt:
            grads = torch.autograd.grad(out, [ins[i] for i in wrt], cast(grad_out))
        results.append((out.detach(), grads))
    (eo, eg), (oo, og) = results
    return eo, oo, eg, og


def ref_fn(scale, act):
    return lambda x, w, b, aw, ab, bw, bb: reference.adapter_linear_ref(x, w, b, aw, ab, bw, bb, scale, act)

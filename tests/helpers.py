"""Shared builders for the op tests: inputs of a trained-looking layer, and eager/float64 runs of a formula.

The tolerance rule is ``adaptkern.testing`` (``assert_close(name, ref, out, eager)``): the tests
call it directly, as ``adaptkern check`` and the benchmarks do.
"""

import contextlib
from collections import Counter

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from adaptkern.ops.adapter_linear import reference


@contextlib.contextmanager
def count_launches():
    """Count Triton kernel launches by kernel name, compiled (CUDA) or interpreted: proof that a
    comparison ran adaptkern's fused kernels, not a silent fallback to eager or PEFT's own layer."""
    launches = Counter()
    patched = [(cls, cls.run) for cls in (JITFunction, InterpretedFunction)]

    def counting(run):
        def wrapper(self, *args, **kwargs):
            launches[self.fn.__name__ if hasattr(self, "fn") else self.__name__] += 1
            return run(self, *args, **kwargs)
        return wrapper

    for cls, run in patched:
        cls.run = counting(run)
    try:
        yield launches
    finally:
        for cls, run in patched:
            cls.run = run


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


def transposed_storage(t):
    """``t`` with the same values and shape, its last two dims laid out transposed in memory."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)

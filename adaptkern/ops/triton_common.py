"""Triton building blocks the kernels of every op share: activations and their derivatives,
row loads, dropout keep-masks (Philox), grouped tile order."""

from __future__ import annotations

import triton
import triton.language as tl


if hasattr(triton, "constexpr_function"):

    @triton.constexpr_function
    def unit(stride):
        """Whether ``stride`` is the compile-time constant 1 (the JIT folds integer arguments
        equal to 1 into constants): the other dimension of that operand is the strided one."""
        return isinstance(stride, int) and stride == 1

else:  # older Triton: no compile-time test, always the masked (always vectorisable) form

    @triton.jit
    def unit(stride):
        return False


@triton.jit
def load_rows(idx, n, STRIDED: tl.constexpr):
    """Row (or column) indices to load and the mask for them. Along a strided dimension,
    indices past ``n`` are clamped to n-1 (a valid row, dropped at the store): no mask in
    the K loop. Along the contiguous dimension clamping would hide the contiguity from
    Triton's alignment analysis (16-byte copies become 2-byte loads), so there it masks."""
    if STRIDED:
        return tl.minimum(idx, n - 1), tl.full(idx.shape, True, tl.int1)
    return idx, idx < n


@triton.jit
def sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def act(z, ACT: tl.constexpr):
    """f(z) in fp32; every f has f(0) = 0, so masked (zero) rank columns stay zero."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = z * sigmoid(2.0 * u)  # 0.5·z·(1 + tanh(u)) = z·σ(2u)
    elif ACT == 4:
        z = z * sigmoid(z)
    return z


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """f'(z) in fp32 (relu'(0) = 0)."""
    if ACT == 0:
        g = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == 1:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        # Φ(z) + z·φ(z), with exp(-z²/2) as exp2(-z²/(2·ln 2)): the 128×128 epilogue of dZ
        # fits in 244 registers (the exp form spilled 12 B a thread).
        g = 0.5 * tl.math.erf(z * 0.7071067811865476) + (
            0.5 + z * 0.3989422804014327 * tl.exp2(-0.7213475204444817 * z * z))
    elif ACT == 3:
        t = 2.0 * sigmoid(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)) - 1.0
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        sg = sigmoid(z)
        g = sg * (1.0 + z * (1.0 - sg))
    return g


@triton.jit
def keep_threshold(p):
    """Dropout keeps x[r, c] when its 32-bit draw is >= p·2³² (integer compare)."""
    return tl.cast(p * 4294967296.0, tl.uint32)


@triton.jit
def keep_scale(seed, rows, c0, ld, p, BC: tl.constexpr):
    """Dropout multiplier [len(rows), BC] of x[rows, c0:c0+BC] (x has leading dim ``ld``;
    c0 % 4 == 0): 1/(1-p) kept, 0 dropped.

    One Philox-4x32-10 call gives the draws of four neighbouring columns: counter
    row·⌈ld/4⌉ + col//4, lane col % 4 (the stream ``keep_elem`` reads element by element).
    The mask is a pure function of (seed, row, col), so backward regenerates it.
    """
    g = rows.to(tl.int64)[:, None] * ((ld + 3) // 4) + (c0 // 4 + tl.arange(0, BC // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, g)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (g.shape[0], BC))
    return tl.where(r >= keep_threshold(p), 1.0 / (1.0 - p), 0.0)


@triton.jit
def keep_elem(seed, rows, cols, ld, p):
    """``keep_scale`` element by element: True where x[rows, cols] is kept."""
    r0, r1, r2, r3 = tl.randint4x(seed, rows.to(tl.int64) * ((ld + 3) // 4) + cols // 4)
    lane = cols % 4
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return r >= keep_threshold(p)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order of output tiles: GROUP_M row tiles sweep N together."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n

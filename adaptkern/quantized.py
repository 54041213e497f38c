"""QLoRA: LoRA on a bitsandbytes 4-bit (NF4 or FP4) frozen weight, dequantized tile by tile inside
the fused kernels (``adaptkern::quantized_lora_linear``; for mixed-adapter batches the base alone,
``adaptkern::quantized_linear``, plus the serving delta); W never exists in 16 or 32 bits.

bitsandbytes is optional: nothing here imports it. :class:`QuantizedWeight` reads a
``Params4bit`` and its ``QuantState`` by their attributes (duck typing) into plain tensors, and
the op needs only those tensors.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import validation as check
from .functional import any_requires_grad, autocast_input, flatten_rows
from .mixed import check_slot_values
from .ops.common import acc_dtype
from .ops.config import ONEPASS_MAX_RANK
from .ops.lora_delta import add_lora_delta_op
from .ops.quantized_lora_linear import (NESTED_BLOCKSIZE, QUANT_TYPES, ROUTES, code_pairs, code_table,
                                        quantized_linear_op, quantized_lora_linear_op)
from .slot_mapping import resolve_ids

# The block sizes bitsandbytes quantizes with; the kernels read every one of them exactly.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _tables(quant_type: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """(code [16], code_pairs(code) [256, 2]) of a quant type on a device, built once."""
    code = code_table(quant_type, device)
    return code, code_pairs(code)


def _code(quant_type: str, device: torch.device) -> Tensor:
    return _tables(quant_type, device)[0]


def _pairs(qw: "QuantizedWeight") -> Tensor:
    """The byte table of ``qw.code``: the cached one when the code is the cached table of its
    quant type (every ``from_bnb`` weight), else built here."""
    if qw.quant_type in QUANT_TYPES:
        code, pairs = _tables(qw.quant_type, qw.code.device)
        if qw.code is code:
            return pairs
    return code_pairs(qw.code.float())


NESTED_FIELDS = ("nested_absmax", "nested_code", "offset")


def _flat(source: str, name: str, t, dtype: torch.dtype, numel: int, device, need: str) -> None:
    """Raise unless field ``name`` is a contiguous 1-D ``dtype`` tensor of ``numel`` entries on
    ``device`` (``need`` says why that many)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{source} {name} must be a tensor, got {type(t).__name__}")
    if t.numel() != numel:
        raise ValueError(f"{source} {name} has {t.numel()} entries; {need}")
    if t.dtype != dtype:
        raise TypeError(f"{source} {name} must be {dtype}, got {t.dtype}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{source} {name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)} strides "
                         f"{t.stride()}")
    if t.device != device:
        raise ValueError(f"{source} {name} is on {t.device}, data on {device}")


def _check_weight(qw: "QuantizedWeight", source: str) -> None:
    """Raise unless ``qw`` describes a 4-bit W [N, K] the kernels read exactly and within bounds:
    every field's type, dtype, entry count, layout and device (``source`` names it in the
    message). The one check of :meth:`QuantizedWeight.from_bnb` and of a QuantizedWeight passed
    directly to the ops of this module."""
    if qw.quant_type not in QUANT_TYPES:
        raise NotImplementedError(f"{source} quant type {qw.quant_type!r}: adaptkern reads {QUANT_TYPES}")
    if isinstance(qw.blocksize, bool) or qw.blocksize not in BLOCKSIZES:
        raise NotImplementedError(f"{source} block size {qw.blocksize!r}: adaptkern reads {BLOCKSIZES}")
    if not isinstance(qw.dtype, torch.dtype):
        raise TypeError(f"{source} dtype must be a torch.dtype, got {type(qw.dtype).__name__}")
    if qw.dtype not in WEIGHT_DTYPES:
        raise NotImplementedError(f"{source} dtype {qw.dtype}: adaptkern reads {WEIGHT_DTYPES}")
    shape = qw.shape
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise ValueError(f"{source} shape must be [N, K] with N, K >= 1, got {shape!r}")
    n, k = shape
    nbytes, blocks = (n * k + 1) // 2, -(-n * k // qw.blocksize)
    device = qw.data.device if isinstance(qw.data, Tensor) else None
    _flat(source, "data", qw.data, torch.uint8, nbytes, device, f"shape {tuple(shape)} needs {nbytes} packed bytes")
    given = [name for name in NESTED_FIELDS if getattr(qw, name) is not None]
    if given and len(given) != len(NESTED_FIELDS):
        raise ValueError(f"{source}: {', '.join(NESTED_FIELDS)} go together (double quantization), got "
                         f"{', '.join(given)} only")
    nested = bool(given)
    if nested and isinstance(qw.absmax, Tensor) and qw.absmax.dtype != torch.uint8:
        raise NotImplementedError(f"{source}: double-quantized absmax stored as {qw.absmax.dtype}: adaptkern reads "
                                  "uint8")
    _flat(source, "absmax", qw.absmax, torch.uint8 if nested else torch.float32, blocks, device,
          f"shape {tuple(shape)} in blocks of {qw.blocksize} needs {blocks}")
    code = qw.code
    if not isinstance(code, Tensor) or not code.is_floating_point() or tuple(code.shape) != (16,):
        got = f"{code.dtype} {tuple(code.shape)}" if isinstance(code, Tensor) else type(code).__name__
        raise TypeError(f"{source} code must be a floating tensor [16] (the 4-bit code table), got {got}")
    if code.device != device:
        raise ValueError(f"{source} code is on {code.device}, data on {device}")
    if nested:
        want = -(-blocks // NESTED_BLOCKSIZE)
        _flat(source, "nested_absmax", qw.nested_absmax, torch.float32, want, device,
              f"{blocks} blocks in nested blocks of {NESTED_BLOCKSIZE} need {want}")
        _flat(source, "nested_code", qw.nested_code, torch.float32, 256, device, "the nested code table has 256")
        _flat(source, "offset", qw.offset, torch.float32, 1, device, "the nested offset is one value")


class QuantizedWeight(NamedTuple):
    """A bitsandbytes 4-bit weight ``W [N, K]`` as plain tensors (the layout is in
    ``adaptkern/ops/quantized_lora_linear/reference.py``).

    Shapes: data uint8 [⌈N·K/2⌉] (two codes per byte, first in the high nibble), absmax
    [B = ⌈N·K/blocksize⌉] float32, or uint8 when double-quantized, with nested_absmax
    [⌈B/256⌉] float32, nested_code [256] float32 and offset [1] float32; code [16] float32.
    ``dtype`` is the dtype bitsandbytes dequantizes to (the weight's before quantization).
    One built by hand is checked as :meth:`from_bnb` checks its own (every field's dtype,
    entry count, layout and device) when :func:`qlora_linear` or :func:`mixed_qlora_linear`
    receives it, before anything runs.
    """

    data: Tensor
    absmax: Tensor
    code: Tensor
    shape: tuple
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    nested_absmax: Optional[Tensor] = None
    nested_code: Optional[Tensor] = None
    offset: Optional[Tensor] = None

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "QuantizedWeight":
        """Read a bitsandbytes ``Params4bit`` (or its packed tensor plus ``quant_state``, a
        ``QuantState``); shares the tensors, copies nothing but the 16-entry code table.

        Errors: ValueError for a ``Params4bit`` not yet quantized, a missing quant state, or a
        quant state that does not match the packed data (shape, byte count, absmax count);
        NotImplementedError naming what adaptkern cannot read exactly: a quant type other than
        nf4/fp4, a block size outside 32…4096, a nested block size other than 256, a dtype
        other than fp16/bf16/fp32, the CPU-repacked layout (``packing_format_for_cpu``) or a
        non-contiguous storage.
        """
        if not isinstance(weight, Tensor):
            raise TypeError("weight must be a packed 4-bit tensor (bitsandbytes Params4bit), "
                            f"got {type(weight).__name__}")
        if getattr(weight, "bnb_quantized", True) is False:
            raise ValueError("weight is a Params4bit that is not quantized yet (bnb_quantized=False): move the "
                             "module to its device (.to(device) or .cuda()) so bitsandbytes quantizes it")
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("no quant state: pass quant_state= (a bitsandbytes QuantState) or a Params4bit "
                             "that has one")
        if getattr(qs, "packing_format_for_cpu", False):
            raise NotImplementedError("quant state in bitsandbytes' CPU-repacked layout (packing_format_for_cpu): "
                                      "adaptkern reads the standard packed layout only")
        data = weight.data if hasattr(weight, "data") else weight
        if data.dtype != torch.uint8:
            if not data.is_contiguous():
                raise NotImplementedError(f"non-contiguous {data.dtype} storage of a packed weight {tuple(data.shape)}")
            data = data.view(torch.uint8)
        data = data.reshape(-1)
        shape = tuple(qs.shape) if qs.shape is not None else ()
        quant_type, blocksize = getattr(qs, "quant_type", None), getattr(qs, "blocksize", None)
        device = data.device
        code = _code(quant_type, device) if quant_type in QUANT_TYPES else None
        absmax = qs.absmax.reshape(-1)
        state2 = getattr(qs, "state2", None)
        if state2 is None:
            qw = cls(data, absmax.float(), code, shape, blocksize, quant_type, qs.dtype)
        else:
            if state2.blocksize != NESTED_BLOCKSIZE:
                raise NotImplementedError(f"nested block size {state2.blocksize}: adaptkern reads {NESTED_BLOCKSIZE}")
            offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=device).reshape(1)
            qw = cls(data, absmax, code, shape, blocksize, quant_type, qs.dtype, state2.absmax.reshape(-1).float(),
                     state2.code.reshape(-1).float(), offset)
        _check_weight(qw, "quant state")
        return qw

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def qlora_linear(x, weight, quant_state, bias, lora_a, lora_b, *, scale=1.0, dropout=0.0, route="auto"):
    """Fused LoRA on a bitsandbytes 4-bit weight (QLoRA).

    Semantics: y = x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ, W = dequantize_4bit(weight,
    quant_state) cast to x's dtype (bit-equal to bitsandbytes' values), dequantized inside
    the kernels.

    Shapes: x [..., K]; weight a ``Params4bit`` (``quant_state`` None: its own), a packed
    tensor with ``quant_state`` a ``QuantState`` for W [N, K], or a :class:`QuantizedWeight`
    (``quant_state`` None); bias [N] | None; lora_a [r, K]; lora_b [N, r] -> y [..., N] in x's
    dtype. Gradients flow to x, bias, lora_a and lora_b; W is frozen. Dropout (p > 0) applies
    to the adapter branch's x only.

    Errors: as :meth:`QuantizedWeight.from_bnb` for the weight; TypeError/ValueError naming
    the argument and the shapes for x, bias, lora_a, lora_b, scale, dropout and route, all
    raised before any computation.
    """
    qw = _weight_and_input(weight, quant_state, x)
    n, k = qw.shape
    check.tensor("bias", bias, 1, optional=True)
    check.tensor("lora_a", lora_a, 2)
    check.tensor("lora_b", lora_b, 2)
    r = lora_a.shape[0]
    check.shape("bias", bias, (n,), "N of the weight")
    check.shape("lora_a", lora_a, (r, k), "[r, K], K of x and the weight")
    check.shape("lora_b", lora_b, (n, r), "[N, r], N of the weight, r of lora_a")
    if r < 1:
        raise ValueError(f"the adapter rank must be at least 1, got lora_a {tuple(lora_a.shape)}")
    check.same_device(dict(x=x, weight=qw.data, bias=bias, lora_a=lora_a, lora_b=lora_b))
    scale = check.real("scale", scale)
    dropout = check.dropout("dropout", dropout)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if route == "onepass" and r > 2 * ONEPASS_MAX_RANK:
        raise ValueError(f"route='onepass' supports r <= {2 * ONEPASS_MAX_RANK}, got r={r}")

    x = autocast_input(x)
    bias, lora_a, lora_b = (None if t is None else t.to(x.dtype) for t in (bias, lora_a, lora_b))
    x2, lead = flatten_rows(x)
    seed = None
    if dropout > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    y, _ = quantized_lora_linear_op(x2, *_op_weight(qw), bias, lora_a, lora_b, scale, dropout, seed,
                                    any_requires_grad(x, bias, lora_a, lora_b), route)
    return y.reshape(*lead, n)


def _weight_and_input(weight, quant_state, x) -> QuantizedWeight:
    """The weight as a :class:`QuantizedWeight`, after checking x [..., K] against it."""
    if isinstance(weight, QuantizedWeight):
        if quant_state is not None:
            raise ValueError("quant_state must be None when weight is a QuantizedWeight (it carries its own)")
        _check_weight(weight, "QuantizedWeight")
        qw = weight
    else:
        qw = QuantizedWeight.from_bnb(weight, quant_state)
    check.tensor("x", x)
    if x.dim() < 1 or x.shape[-1] != qw.shape[1]:
        raise ValueError(f"x's last dim must equal the weight's K: x {tuple(x.shape)}, weight [N, K] = {qw.shape}")
    return qw


def _op_weight(qw: QuantizedWeight) -> tuple:
    """The weight arguments of the ``adaptkern::quantized_*`` ops, from qweight to w_dtype."""
    return (qw.data, qw.absmax, qw.nested_absmax, qw.nested_code, qw.offset, _pairs(qw), qw.shape[0], qw.blocksize,
            qw.dtype)


def mixed_qlora_linear(x, weight, quant_state, bias, lora_a, lora_b, adapter_ids, *, scales=None, ranks=None,
                       output_slices=None, validate_ids=True):
    """LoRA on a bitsandbytes 4-bit weight where every row picks its adapter (serving adapters on
    a QLoRA base), optionally with one LoRA per output slice.

    Semantics: :func:`adaptkern.mixed.mixed_lora_linear` with W = dequantize_4bit(weight,
    quant_state) cast to x's dtype: for row m with slot s = adapter_ids[m] in [0, S) and every
    slice j (columns o_j = N_0 + … + N_{j-1} to o_j + N_j; one slice of all N columns without
    ``output_slices``)::

        y[m, o_j:o_j+N_j] = x_m·W[o_j:o_j+N_j]ᵀ + b[o_j:o_j+N_j] + scales[s]·(x_m·A_{j,s}[:r_s]ᵀ)·B_{j,s}[:, :r_s]ᵀ

    and a row with id -1 (or, unchecked, any id outside [0, S)) gets exactly the base
    x_m·Wᵀ + b of ``adaptkern::quantized_linear``. Two fused steps, W never materialised in 16
    or 32 bits: the 4-bit base GEMM (W dequantized in its K loop) writes y, then
    ``adaptkern::add_lora_delta_`` (as :func:`adaptkern.serving.add_lora_delta`) adds every
    row's delta in place. Launches: the base, then one delta launch at decode sizes (the shrink
    recomputed in the expand, where ``adaptkern.ops.lora_delta.one_launch`` allows it), else two
    (shrink, expand).

    Shapes: x [M, K] (or [..., K] with adapter_ids [...]); weight a ``Params4bit`` (quant_state
    None), a packed tensor with its ``QuantState``, or a :class:`QuantizedWeight` (quant_state
    None), for W [N, K]; bias [N] | None; without output_slices lora_a [S, R_max, K], lora_b
    [S, N, R_max]; with output_slices (N_0, …, N_{n-1}) summing to N, lora_a and lora_b are
    sequences of n tensors [S, R_max, K] and [S, N_j, R_max]; adapter_ids [M] int32/int64 (or a
    list of ints) in [-1, S), or a :class:`~adaptkern.slot_mapping.SlotMapping` of M rows; scales
    [S] float (None: 1); ranks [S] int in [0, R_max] (None: R_max) -> y [..., N] in x's dtype;
    M = 0 included.

    Inference only: with grad enabled, inputs that require grad (x, bias, lora_a, lora_b,
    scales) are refused with ValueError; detach them or run under ``torch.no_grad()``.

    Errors: as :meth:`QuantizedWeight.from_bnb` for the weight; TypeError/ValueError naming the
    argument and the shapes for the rest, all raised before any computation. The value checks
    (ids and ranks in range, scales finite in the compute dtype) read tensors on the host;
    ``validate_ids=False``, torch.compile and CUDA graph capture skip them.
    """
    qw = _weight_and_input(weight, quant_state, x)
    n, k = qw.shape
    check.tensor("bias", bias, 1, optional=True)
    check.shape("bias", bias, (n,), "N of the weight")
    sliced = output_slices is not None
    a_list = check.slices("lora_a", lora_a, 3, single=not sliced)
    b_list = check.slices("lora_b", lora_b, 3, single=not sliced)
    if len(b_list) != len(a_list):
        raise ValueError(f"lora_a has {len(a_list)} slices but lora_b has {len(b_list)}")
    widths = check.output_slices(output_slices, len(a_list), n) if sliced else (n,)
    s, r = check.lora_stacks(a_list, b_list, k, widths)
    scales = check.slot_vector("scales", scales, s, floating=True, optional=True)
    ranks = check.slot_vector("ranks", ranks, s, floating=False, optional=True)
    named = dict(x=x, bias=bias, scales=scales, **{f"lora_a[{i}]": t for i, t in enumerate(a_list)},
                 **{f"lora_b[{i}]": t for i, t in enumerate(b_list)})
    check.same_device(dict(named, weight=qw.data, ranks=ranks))
    if torch.is_grad_enabled():
        needing = [name for name, t in named.items() if t is not None and t.requires_grad]
        if needing:
            raise ValueError(f"mixed_qlora_linear is inference only, but {', '.join(needing)} require grad: detach "
                             f"them or run under torch.no_grad() (train a QLoRA adapter with qlora_linear)")
    x = autocast_input(x)
    acc = acc_dtype(x.dtype)
    if check.value_checks_enabled(validate_ids):
        check_slot_values(scales, ranks, r, acc, f"lora_a {tuple(a_list[0].shape)}")
    x2, lead = flatten_rows(x)
    ids, sorted_rows, _ = resolve_ids(adapter_ids, x2.shape[0], s, validate=validate_ids, lead=lead, device=x.device)
    y = quantized_linear_op(x2, *_op_weight(qw), None if bias is None else bias.to(x.dtype))
    add_lora_delta_op(y, x2, [a.to(x.dtype) for a in a_list], [b.to(x.dtype) for b in b_list],
                      None if scales is None else scales.to(acc), None if ranks is None else ranks.to(torch.int32),
                      ids, sorted_rows, 0, None)
    return y.reshape(*lead, n)

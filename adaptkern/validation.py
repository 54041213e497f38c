"""Every host-side input check of adaptkern, written once.

Each function raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad
value) with a message that names the argument and the shapes involved, and returns the
normalised value. Callers run all their checks before they change any state.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Optional

import torch
from torch import Tensor

from .ops import common

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, ndim: Optional[int] = None, *, optional: bool = False) -> Optional[Tensor]:
    """A floating tensor (fp16/bf16/fp32/fp64) of ``ndim`` dims; None only when ``optional``."""
    if t is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def shape(name: str, t: Optional[Tensor], want: tuple, what: str) -> None:
    """``t`` (when given) has shape ``want``; ``what`` says where ``want`` comes from."""
    if t is not None and tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} must have shape {tuple(want)} ({what}), got {tuple(t.shape)}")


def same_device(named: dict) -> None:
    """All given tensors of ``{name: tensor | None}`` live on one device."""
    devices = {n: t.device for n, t in named.items() if t is not None}
    first = next(iter(devices))
    for n, d in devices.items():
        if d != devices[first]:
            raise ValueError(f"all tensors must be on one device: {first} is on {devices[first]}, {n} is on {d}")


def linear_input(x, weight) -> tuple[int, int]:
    """x [..., K] and weight [N, K], both floating -> (N, K)."""
    tensor("x", x)
    tensor("weight", weight, 2)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., K], got shape {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim must equal weight's K: x {tuple(x.shape)}, weight {tuple(weight.shape)} [N, K]")
    return n, k


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def finite_in(values, dtype: torch.dtype) -> bool:
    """Every |value| is at most ``dtype``'s largest finite value (NaN and ±Inf fail). ``values``:
    a number or a tensor (a tensor's values are read on the host)."""
    bound = torch.finfo(dtype).max
    return bool((values.abs() <= bound).all()) if isinstance(values, Tensor) else abs(values) <= bound


def real(name: str, value, dtype: torch.dtype = torch.float32) -> float:
    """A real number (not a bool) finite in ``dtype`` -> float. Scales and alphas default to
    float32: a Python float reaches a Triton kernel as fp32."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not finite_in(value, dtype):
        raise ValueError(f"{name} must be finite in {str(dtype).removeprefix('torch.')}, got {value!r}")
    return float(value)


def dropout(name: str, value) -> float:
    """A probability in [0, 1)."""
    p = real(name, value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return p


def placement(value) -> str:
    if value not in common.PLACEMENTS:
        raise ValueError(f"placement must be one of {common.PLACEMENTS}, got {value!r}")
    return value


def activation(value) -> str:
    """An activation name or alias -> its canonical name."""
    return common.canonical_activation(value)


def adapter_name(name, what: str = "adapter name") -> str:
    """A non-empty str without '.' (adapter names become state-dict key parts)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{what} must be a non-empty str without '.', got {name!r}")
    return name


def finite_tensor(name: str, t: Tensor) -> Tensor:
    """``t`` holds no NaN or Inf (in its own dtype: check after any cast)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf (in {t.dtype})")
    return t


def slot_vector(name: str, t, num_slots: int, *, floating: bool, optional: bool = False) -> Optional[Tensor]:
    """A per-slot tensor [S]: floating (scales) or integer (ranks)."""
    if t is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a [S] tensor, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({num_slots},), got {type(t).__name__}")
    if floating != t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be a {'floating' if floating else 'integer'} tensor, got {t.dtype}")
    if tuple(t.shape) != (num_slots,):
        raise ValueError(f"{name} must have shape ({num_slots},) (one per slot), got {tuple(t.shape)}")
    return t


def value_checks_enabled(validate: bool) -> bool:
    """Whether checks that read tensor values on the host may run: not when the caller opted
    out, under torch.compile, or during CUDA graph capture."""
    if not validate or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def adapter_ids(ids, m: int, num_slots: int, *, validate: bool = True, lead: tuple = (), device=None) -> Tensor:
    """Validate ``adapter_ids`` and return it flat.

    Semantics: ids [M] (or shaped like x's leading dims ``lead``), int32/int64, values in
    [-1, num_slots), on ``device`` (None: any) -> ids [M]. A list or tuple of ints becomes an
    int64 tensor on ``device``. An adapter id is always a slot index of a slot stack; -1 (and,
    unchecked, any id outside [0, num_slots)) means base only.

    Errors: TypeError for another type or a non-integer dtype, ValueError for a wrong shape,
    a tensor on another device, or a value out of range. The value check reads the ids on
    the host (a sync): it runs only where :func:`value_checks_enabled`.
    """
    if isinstance(ids, (list, tuple)):
        try:
            ids = torch.tensor(ids, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"adapter_ids as a list must hold ints: {e}") from None
        if ids.numel() == 0:
            ids = ids.long()
        elif ids.dtype != torch.int64:
            raise TypeError(f"adapter_ids as a list must hold ints, got {ids.dtype} values")
    if not isinstance(ids, Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor or a list of ints, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be int32 or int64, got {ids.dtype}")
    if device is not None and ids.device != torch.device(device):
        raise ValueError(f"adapter_ids must be on x's device {device}, got {ids.device}")
    if ids.numel() != m or (ids.dim() != 1 and tuple(ids.shape) != tuple(lead)):
        raise ValueError(f"adapter_ids must have shape ({m},) (one id per row of x) or {tuple(lead)}, "
                         f"got {tuple(ids.shape)}")
    ids = ids.reshape(m)
    if value_checks_enabled(validate) and m > 0:
        bad = (ids < -1) | (ids >= num_slots)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"adapter_ids[{row}] = {int(ids[row])} is out of range: valid ids are -1 (base only) "
                             f"and 0..{num_slots - 1} ({num_slots} slots)")
    return ids


def slices(name: str, stacks, ndim: int, *, single: bool) -> list:
    """``stacks`` as a list of floating ``ndim``-D tensors: one tensor (``single``) or a non-empty
    list/tuple of them (the slices of a packed projection)."""
    if single:
        return [tensor(name, stacks, ndim)]
    if not isinstance(stacks, (list, tuple)) or not stacks:
        raise TypeError(f"{name} must be a non-empty list or tuple of tensors (one per output slice), "
                        f"got {type(stacks).__name__}")
    return [tensor(f"{name}[{i}]", t, ndim) for i, t in enumerate(stacks)]


def output_slices(value, count: int, total: Optional[int] = None) -> tuple:
    """Slice widths (N_0, …, N_{n-1}): ``count`` positive ints, summing to ``total`` when given."""
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, Integral) or v < 1
                                                   for v in value):
        raise TypeError(f"output_slices must be a list or tuple of positive ints, got {value!r}")
    if len(value) != count:
        raise ValueError(f"output_slices has {len(value)} entries but there are {count} adapter slices")
    if total is not None and sum(value) != total:
        raise ValueError(f"output_slices {tuple(value)} must sum to weight.shape[0] = {total}, got {sum(value)}")
    return tuple(int(v) for v in value)


def lora_stacks(a_list: list, b_list: list, k: Optional[int], widths: Optional[tuple]) -> tuple[int, int]:
    """a_list n × [S, R, K] and b_list n × [S, N_i, R] (N_i = widths[i] when given; K = k when given) -> (S, R)."""
    s, r = tuple(a_list[0].shape[:2]) if a_list else (b_list[0].shape[0], b_list[0].shape[2])
    for i, a in enumerate(a_list):
        if tuple(a.shape[:2]) != (s, r) or (k is not None and a.shape[2] != k):
            raise ValueError(f"lora_a[{i}] must be [S, R_max, K] = {(s, r, k if k is not None else a.shape[2])}, "
                             f"got {tuple(a.shape)}")
    for i, b in enumerate(b_list):
        want = (s, widths[i] if widths is not None else b.shape[1], r)
        if tuple(b.shape) != want:
            raise ValueError(f"lora_b[{i}] must be [S, N_i, R_max] = {want} to match lora_a and output_slices, "
                             f"got {tuple(b.shape)}")
    return s, r

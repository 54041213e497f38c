"""SGLang: a LoRA backend (SGLang's ``BaseLoRABackend`` contract) running adaptkern's serving ops.

:func:`register`, run as an SGLang plug-in, adds it to SGLang's backend registry under the
name ``"adaptkern"``, as a subclass of SGLang's ``BaseLoRABackend``. SGLang is imported only there.

SGLang's layouts: per LoRA buffer slot l, A of a stacked module (c slices: 3 for qkv, 2 for
gate_up) is packed at the adapter's actual rank r_l: rows [j·r_l, (j+1)·r_l) of
``A[l]`` [c·r_max, in] are slice j; B slices are column blocks of ``B[l]`` [out, r_max] (qkv:
by ``output_offset``); per-slot ``lora_ranks`` (0: the slot adds nothing) and ``scalings``.
A batch is segments (sequences) with one slot each.

:meth:`AdaptkernLoRABackend.forward_with_base` is SGLang's hook where a backend may replace the
engine's base GEMM + LoRA calls: for an unquantized base it runs one fused
:func:`adaptkern.mixed.mixed_lora_linear` for the base GEMM and every slice.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..mixed import mixed_lora_linear
from ..serving import add_lora_delta, lora_expand, lora_shrink
from ..slot_mapping import SlotMapping

__all__ = ["AdaptkernLoRABackend", "BACKEND_NAME", "LoRABatch", "register"]

BACKEND_NAME = "adaptkern"


@dataclass(eq=False)
class LoRABatch:
    """The backend's ``batch_info``: one forward batch as SGLang's layers and manager read it.

    ``mapping`` holds the per-token slots; ``bs`` segments of ``seg_lens`` tokens with slots
    ``weight_indices``; ``lora_ranks`` / ``scalings`` are the backend's per-slot tensors [S];
    ``has_active_lora``: some segment's slot has rank > 0; ``use_cuda_graph``: the preallocated
    decode-graph batch, refilled in place (``tokens_per_request`` rows per request).
    """

    mapping: SlotMapping
    bs: int = 0
    seg_lens: list = field(default_factory=list)
    weight_indices: list = field(default_factory=list)
    lora_ranks: Optional[Tensor] = None
    scalings: Optional[Tensor] = None
    has_active_lora: bool = False
    is_prefill: bool = False
    use_cuda_graph: bool = False
    tokens_per_request: int = 1


class AdaptkernLoRABackend:
    """SGLang's LoRA backend contract on adaptkern's ops.

    Semantics (token t in a segment with slot l, r = lora_ranks[l], s = scalings[l]):
      run_lora_a_sgemm: out[t, :c·r] = s·x_t·A[l, :c·r]ᵀ, zeros beyond (the scale is applied here)
      run_lora_b_sgemm: out[t] (+)= x_t[:r]·B[l, :, :r]ᵀ (into ``base_output`` when given)
      run_qkv_lora / run_gate_up_lora: out[t, o_j:o_{j+1}] (+)= s·(x_t·A_jᵀ)·B[l, o_j:o_{j+1}, :r]ᵀ,
        A_j = A[l, j·r:(j+1)·r], one :func:`adaptkern.add_lora_delta` call for every slice.
      forward_with_base: the layer's base output plus the same per-slice delta (see there).
    The per-token slots live in a :class:`~adaptkern.slot_mapping.SlotMapping` refilled in place
    (preallocated by :meth:`init_decode_cuda_graph_batch_info` for graph replays), part of the
    :class:`LoRABatch` that :meth:`prepare_lora_batch` makes :attr:`batch_info`.
    """

    name = BACKEND_NAME
    # SGLang's capability flags, read by its layers, manager and graph runners: no overlapped
    # shrink stream, no prefill graphs, and adapter-free batches still run (rank-0 slots add nothing).
    supports_lora_a_overlap = False
    skip_inactive_lora_batches = False
    skip_inactive_dense_lora = False
    supports_prefill_cuda_graph = False

    def __init__(self, max_loras_per_batch: int, device, **kwargs):
        mro = type(self).__mro__
        if mro[mro.index(AdaptkernLoRABackend) + 1] is not object:  # registered: SGLang's base is next
            super().__init__(max_loras_per_batch, device)
        self.max_loras_per_batch = int(max_loras_per_batch)
        self.device = torch.device(device)
        self.batch_info: Optional[LoRABatch] = None
        self.decode_cuda_graph_batch_info: Optional[LoRABatch] = None
        self.ranks = torch.zeros(self.max_loras_per_batch, dtype=torch.int32, device=self.device)
        self.scalings = torch.zeros(self.max_loras_per_batch, dtype=torch.float32, device=self.device)
        self._packed: dict = {}
        self._host_ranks: tuple = ()

    @property
    def mapping(self) -> Optional[SlotMapping]:
        """The prepared batch's per-token slots (None before a batch or after a reset)."""
        return None if self.batch_info is None else self.batch_info.mapping

    @property
    def graph_mapping(self) -> Optional[SlotMapping]:
        """The preallocated slots decode graph replays refill (None before the graph init)."""
        info = self.decode_cuda_graph_batch_info
        return None if info is None else info.mapping

    # -- batch preparation ---------------------------------------------------------------------

    def get_batch_info(self, layout=None) -> Optional["LoRABatch"]:
        """The prepared batch (None: no batch, the layers run the base alone). One token layout
        only, so ``layout`` selects nothing."""
        return self.batch_info

    def reset_batch_state(self) -> None:
        """Forget the prepared batch (SGLang's idle forwards), and the base's lm_head state."""
        reset = getattr(super(), "reset_batch_state", None)
        if reset is not None:
            reset()
        self.batch_info = None

    def init_decode_cuda_graph_batch_info(self, max_bs_in_cuda_graph: int, num_tokens_per_req: int = 1) -> None:
        """Preallocate the batch decode graph replays refill: max_bs_in_cuda_graph·num_tokens_per_req rows
        (num_tokens_per_req > 1: speculative target verification)."""
        self.decode_cuda_graph_batch_info = LoRABatch(
            mapping=SlotMapping.empty(max_bs_in_cuda_graph * num_tokens_per_req, self.max_loras_per_batch,
                                      device=self.device),
            tokens_per_request=int(num_tokens_per_req), use_cuda_graph=True)

    def init_cuda_graph_batch_info(self, *args, max_bs_in_cuda_graph: Optional[int] = None,
                                   num_tokens_per_bs: int = 1, **kwargs) -> None:
        """The earlier name of :meth:`init_decode_cuda_graph_batch_info` (its batch-info argument,
        when given, is not used)."""
        bs = max_bs_in_cuda_graph if max_bs_in_cuda_graph is not None else next(
            a for a in args if isinstance(a, int))
        self.init_decode_cuda_graph_batch_info(bs, num_tokens_per_bs)

    def prepare_lora_batch(self, forward_batch, weight_indices: list, lora_ranks: list, scalings: list,
                           use_decode_cuda_graph: bool = False, use_prefill_cuda_graph: bool = False, *,
                           use_cuda_graph: bool = False) -> None:
        """Per-token slots from the segments (extend: ``extend_seq_lens_cpu`` tokens per sequence;
        decode: one, or the graph's tokens per request), ranks and scalings written in place; the
        result is :attr:`batch_info`. ``use_cuda_graph`` is the earlier name of
        ``use_decode_cuda_graph``; prefill graphs are not supported."""
        if use_prefill_cuda_graph:
            raise ValueError(f"use_prefill_cuda_graph: the {BACKEND_NAME} LoRA backend has no prefill CUDA graphs "
                             f"(supports_prefill_cuda_graph is False)")
        graph = bool(use_decode_cuda_graph or use_cuda_graph)
        if graph and self.decode_cuda_graph_batch_info is None:
            raise ValueError("use_decode_cuda_graph: init_decode_cuda_graph_batch_info was not called, so "
                             "there is no preallocated batch for graph replays")
        if len(weight_indices) != forward_batch.batch_size:
            raise ValueError(f"weight_indices: {len(weight_indices)} entries for batch_size "
                             f"{forward_batch.batch_size}")
        extend = forward_batch.forward_mode.is_extend()
        lens = getattr(forward_batch, "extend_seq_lens_cpu", None) if extend else None
        if lens is None:
            per_request = self.decode_cuda_graph_batch_info.tokens_per_request if graph else 1
            if extend and per_request == 1:
                raise ValueError("forward_batch: an extend batch without extend_seq_lens_cpu")
            lens = [per_request] * forward_batch.batch_size
        lens = [int(n) for n in lens]
        ids = torch.tensor([w for w, n in zip(weight_indices, lens) for _ in range(n)], dtype=torch.int32)
        self._host_ranks = tuple(int(r) for r in lora_ranks)
        self.ranks[:len(lora_ranks)].copy_(torch.tensor(lora_ranks, dtype=torch.int32), non_blocking=True)
        self.scalings[:len(scalings)].copy_(torch.tensor(scalings, dtype=torch.float32), non_blocking=True)
        if graph:
            info = self.decode_cuda_graph_batch_info
            info.mapping.update_(ids.to(self.device, non_blocking=True), validate=False)
        else:
            info = LoRABatch(SlotMapping.from_ids(ids.to(self.device), self.max_loras_per_batch, validate=False))
        info.bs, info.seg_lens, info.weight_indices = len(lens), lens, list(weight_indices)
        info.lora_ranks, info.scalings = self.ranks, self.scalings
        info.has_active_lora = any(self._host_ranks[w] > 0 for w in weight_indices)
        info.is_prefill = extend and not graph
        self.batch_info = info

    # -- the contract's kernels ----------------------------------------------------------------

    def _packed_slices(self, lora_a: Tensor, slices: int) -> list[Tensor]:
        """A of a stacked module as ``slices`` [S, r_max, in] tensors (slot l's rows [j·r_l, (j+1)·r_l)
        moved to rows [0, r_l) of slice j): rebuilt only when A or the ranks change."""
        ranks = self._host_ranks
        key = (lora_a.data_ptr(), lora_a._version, tuple(lora_a.shape), slices, ranks)
        if self._packed.get(id(lora_a), (None,))[0] != key:
            s, rows, _ = lora_a.shape
            r_max = rows // slices
            index = torch.zeros(slices, s, r_max, dtype=torch.long)
            for j in range(slices):
                for slot, r in enumerate(ranks[:s]):
                    index[j, slot, :r] = torch.arange(j * r, (j + 1) * r)
            packed = [lora_a[torch.arange(s, device=lora_a.device)[:, None], index[j].to(lora_a.device)]
                      for j in range(slices)]
            self._packed[id(lora_a)] = (key, packed)
        return self._packed[id(lora_a)][1]

    def run_lora_a_sgemm(self, x: Tensor, weights: Tensor, *args, stack_num: int = 1, **kwargs) -> Tensor:
        """[T, c·r_max] in x's dtype: s·x·A[l, :c·r]ᵀ packed at the slot's rank (zeros beyond)."""
        out = torch.empty(x.shape[0], weights.shape[1], dtype=torch.float32, device=x.device)
        lora_shrink(x, weights, self.mapping, scales=self.scalings, ranks=self.ranks * stack_num, out=out,
                    validate_ids=False)
        return out.to(x.dtype)

    def run_lora_b_sgemm(self, x: Tensor, weights: Tensor, base_output: Optional[Tensor] = None, *args,
                         **kwargs) -> Tensor:
        """[T, out]: x[:, :r]·B[l, :, :r]ᵀ, added into ``base_output`` when given."""
        out = base_output if base_output is not None else torch.zeros(x.shape[0], weights.shape[1], dtype=x.dtype,
                                                                      device=x.device)
        lora_expand(out, x[:, :weights.shape[2]], weights, self.mapping, ranks=self.ranks, add=True,
                    validate_ids=False)
        return out

    def _sliced(self, x, lora_a, lora_b, offsets, base_output):
        slices = len(offsets) - 1
        out = base_output if base_output is not None else torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype,
                                                                       device=x.device)
        b = [lora_b[:, offsets[j]:offsets[j + 1]] for j in range(slices)]
        add_lora_delta(out, x, self._packed_slices(lora_a, slices), b, self.mapping, scales=self.scalings,
                       ranks=self.ranks, validate_ids=False)
        return out

    def run_qkv_lora(self, x: Tensor, qkv_lora_a: Tensor, qkv_lora_b: Tensor, output_offset: Tensor,
                     output_offset_cpu: Optional[Tensor] = None, max_qkv_out_dim: Optional[int] = None,
                     base_output: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        """q, k, v: B's column blocks [o_j, o_{j+1}) of ``output_offset`` [4]."""
        offsets = (output_offset_cpu if output_offset_cpu is not None else output_offset.cpu()).tolist()
        return self._sliced(x, qkv_lora_a, qkv_lora_b, offsets, base_output)

    def run_gate_up_lora(self, x: Tensor, gate_up_lora_a: Tensor, gate_up_lora_b: Tensor,
                         base_output: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        """gate and up: the two halves of B's output columns."""
        half = gate_up_lora_b.shape[1] // 2
        return self._sliced(x, gate_up_lora_a, gate_up_lora_b, [0, half, 2 * half], base_output)

    # -- base GEMM + LoRA ----------------------------------------------------------------------

    def forward_with_base(self, layer, x: Tensor, base_fn, lora_a: Tensor, lora_b: Tensor, output_offset, offsets,
                          *, all_reduce=None, kind: str = "linear", pruned_batch_info=None) -> Tensor:
        """The LoRA layer's output: base(x) plus every slice's delta.

        Semantics (token t with slot l, r = lora_ranks[l], s = scalings[l], c slices with output
        columns [o_j, o_{j+1}) from ``layer.output_offset_cpu`` (else ``output_offset``)):
          y[t, o_j:o_{j+1}] = x_t·W_jᵀ + b_j + s·(x_t·A_jᵀ)·B[l, o_j:o_{j+1}, :r]ᵀ, A_j = A[l, j·r:(j+1)·r].
        Shapes: x [T, K], lora_a [S, c·r_max, K], lora_b [S, N, r_max] -> [T, N].

        Fused (one :func:`~adaptkern.mixed.mixed_lora_linear` launch family for the base GEMM and
        all c slices) when the base is unquantized and local: ``layer.base_layer.quant_method`` is
        SGLang's ``UnquantizedLinearMethod``, its weight a plain [N, K] tensor in x's dtype (bias
        applied unless ``skip_bias_add``), tensor-parallel size 1, no ``all_reduce`` and no
        ``pruned_batch_info``; A's packed slices are rearranged once per A and ranks (cached).
        Otherwise (quantized or unknown bases, TP > 1, lm_head pruning) SGLang's own order:
        ``layer.apply_lora(base_fn(), x)``, or with ``all_reduce`` the shrink, the reductions of
        the base output and the shrink, then the expand into the reduced base output.
        ``offsets`` and ``kind`` are not needed: the slices come from A, B and the output offsets.
        """
        fused = None if all_reduce is not None or pruned_batch_info is not None else self._fusable(
            layer, x, lora_a, lora_b, output_offset)
        if fused is not None:
            weight, bias, widths = fused
            a = [lora_a] if len(widths) == 1 else self._packed_slices(lora_a, len(widths))
            bounds = [sum(widths[:j]) for j in range(len(widths) + 1)]
            b = [lora_b[:, bounds[j]:bounds[j + 1]] for j in range(len(widths))]
            return mixed_lora_linear(x, weight, bias, a, b, self.mapping, scales=self.scalings, ranks=self.ranks,
                                     output_slices=widths, validate_ids=False)
        if all_reduce is None:
            return layer.apply_lora(base_fn(), x)
        shrunk = self.run_lora_a_sgemm(x, lora_a)
        base = all_reduce(base_fn())
        return self.run_lora_b_sgemm(x=all_reduce(shrunk), weights=lora_b, output_offset=output_offset,
                                     output_offset_cpu=getattr(layer, "output_offset_cpu", None), base_output=base)

    def _fusable(self, layer, x: Tensor, lora_a: Tensor, lora_b: Tensor, output_offset):
        """(weight, bias, slice widths) when ``layer``'s base can run fused, else None."""
        base = getattr(layer, "base_layer", None)
        method = type(getattr(base, "quant_method", None)).__name__
        if (self.mapping is None or method != "UnquantizedLinearMethod" or getattr(base, "tp_size", 1) != 1
                or getattr(base, "use_intel_amx_backend", False)):  # AMX repacks the weight
            return None
        weight = getattr(base, "weight", None)
        bias = None if getattr(base, "skip_bias_add", False) else getattr(base, "bias", None)
        if not (isinstance(weight, Tensor) and weight.dim() == 2 and weight.dtype == x.dtype and x.dim() == 2
                and weight.shape[1] == x.shape[1] and lora_b.shape[1] == weight.shape[0]
                and (bias is None or isinstance(bias, Tensor))):
            return None
        rank = lora_b.shape[2]
        slices = lora_a.shape[1] // rank if rank else 0
        bounds = getattr(layer, "output_offset_cpu", None)
        bounds = output_offset if bounds is None else bounds
        bounds = bounds.tolist() if isinstance(bounds, Tensor) else bounds
        if (not slices or slices * rank != lora_a.shape[1] or bounds is None or len(bounds) != slices + 1
                or bounds[0] != 0 or bounds[-1] != weight.shape[0]):
            return None
        widths = tuple(int(bounds[j + 1] - bounds[j]) for j in range(slices))
        return (weight, bias, widths) if min(widths) > 0 else None


@functools.cache
def _on_sglang_base(base: type) -> type:
    """:class:`AdaptkernLoRABackend` subclassing SGLang's ``BaseLoRABackend`` (one class per base):
    adaptkern's members first, the base's for the rest (lm_head and MoE hooks, ``is_moe_lora``)."""
    return type(AdaptkernLoRABackend.__name__, (AdaptkernLoRABackend, base),
                {"__module__": __name__, "__qualname__": AdaptkernLoRABackend.__qualname__,
                 "__doc__": AdaptkernLoRABackend.__doc__})


def register() -> None:
    """SGLang plug-in: add :class:`AdaptkernLoRABackend`, on SGLang's ``BaseLoRABackend``, to
    SGLang's LoRA backend registry as ``"adaptkern"``, and ``"adaptkern"`` to the choices of
    ``--lora-backend`` (SGLang keeps them in the list ``sglang.srt.server_args.LORA_BACKEND_CHOICES``,
    which argparse holds by reference; where that list is missing the CLI is left as it is, with a
    warning)."""
    from sglang.srt.lora.backend.base_backend import BaseLoRABackend
    from sglang.srt.lora.backend.lora_registry import register_lora_backend

    cls = _on_sglang_base(BaseLoRABackend)
    register_lora_backend(BACKEND_NAME)(lambda: cls)
    try:
        from sglang.srt.server_args import LORA_BACKEND_CHOICES as choices
    except ImportError:
        choices = None
    if not isinstance(choices, list):
        warnings.warn(f"adaptkern: no list sglang.srt.server_args.LORA_BACKEND_CHOICES to widen (found "
                      f"{type(choices).__name__}); the backend is registered, but SGLang's CLI may refuse "
                      f"--lora-backend {BACKEND_NAME}", stacklevel=2)
    elif BACKEND_NAME not in choices:
        choices.append(BACKEND_NAME)

"""vLLM: a punica wrapper (vLLM's ``PunicaWrapperBase`` contract) running adaptkern's serving ops.

vLLM resolves its punica wrapper from the platform by qualified name; :func:`register`, run
by vLLM as a general plug-in (entry point group ``vllm.general_plugins``), points the current
platform at :class:`AdaptkernPunicaWrapper`. vLLM is imported only there: the wrapper
itself needs nothing but torch and adaptkern.

vLLM's layouts: ``lora_a_stacked`` / ``lora_b_stacked`` are tuples of one tensor per output
slice, ``[max_loras, 1, r_max, in]`` / ``[max_loras, 1, out_i, r_max]``, ranks zero-padded to
r_max and the scale folded into B at load time; the shrink buffer is fp32 ``[n_slices, T, r_max]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..serving import add_lora_delta, lora_expand, lora_shrink
from ..slot_mapping import SlotMapping

__all__ = ["AdaptkernPunicaWrapper", "WRAPPER_QUALNAME", "register"]

WRAPPER_QUALNAME = "adaptkern.integrations.vllm.AdaptkernPunicaWrapper"


def _slices(name: str, stacked) -> list[Tensor]:
    """vLLM's per-slice [max_loras, 1, rows, cols] tensors as [max_loras, rows, cols] views."""
    stacked = (stacked,) if isinstance(stacked, Tensor) else tuple(stacked)
    for i, t in enumerate(stacked):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[1] != 1:
            raise ValueError(f"{name}[{i}] must be a [max_loras, 1, rows, cols] tensor, got "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
    return [t[:, 0] for t in stacked]


class AdaptkernPunicaWrapper:
    """vLLM's punica wrapper contract on adaptkern's ops; one slot per vLLM LoRA index.

    Semantics (T tokens, slot s = the token's LoRA index, -1: none; A_i = lora_a_stacked[i][s, 0],
    B_i = lora_b_stacked[i][s, 0]):
      add_shrink:         y[i, t] = scale·x_t·A_iᵀ (zeros for -1 tokens)
      add_expand:         y[t, off+o_i : off+o_i+N_i] += x[i, t]·B_iᵀ
      add_lora_linear:    both at once: y[t, o_i : o_i+N_i] += scale·(x_t·A_iᵀ)·B_iᵀ
      add_lora_embedding: y[t] (+)= x_t·Bᵀ (x: the A rows vLLM looked up per token)
      add_lora_logits:    as add_lora_linear for one slice, over the sampled rows' indices.
    Metadata lives in two preallocated :class:`~adaptkern.slot_mapping.SlotMapping` s (tokens and
    sampled rows) refilled in place by :meth:`update_metadata`: a captured CUDA graph replays
    with any mapping and any number of active adapters.
    """

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        config = kwargs.get("lora_config")
        max_loras = getattr(config, "max_loras", None) or kwargs.get("max_loras")
        if max_loras is None:
            raise TypeError("AdaptkernPunicaWrapper needs lora_config (with max_loras) or max_loras")
        self.device = torch.device(device)
        self.max_loras = int(max_loras)
        self.token_mapping = SlotMapping.empty(max_num_batched_tokens, self.max_loras, device=self.device)
        self.sampler_mapping = SlotMapping.empty(max_num_batched_tokens, self.max_loras, device=self.device)
        # vLLM's LoRA embedding layer reads this private base-class buffer itself: per token, the row
        # offset (slot·vocab_size, 0 without a slot) of its A rows in the flattened lora_a_stacked.
        self._embeddings_indices = torch.zeros(max_num_batched_tokens, dtype=torch.long, device=self.device)
        self.is_prefill = False
        self.no_lora = True
        self._scales: dict = {}

    def update_metadata(self, mapping, lora_index_to_id: list, max_loras: int, vocab_size: int, **kwargs) -> None:
        """Slots from vLLM's mapping: a token (``mapping.index_mapping``) or sampled row
        (``mapping.prompt_mapping``) with LoRA id i > 0 uses slot ``lora_index_to_id.index(i)``;
        id 0 (or an id no slot holds): -1. Embedding row offsets: max(slot, 0)·vocab_size."""
        slot_of = {lora_id: slot for slot, lora_id in enumerate(lora_index_to_id) if lora_id is not None}
        tokens = [slot_of.get(i, -1) if i > 0 else -1 for i in mapping.index_mapping]
        samples = [slot_of.get(i, -1) if i > 0 else -1 for i in mapping.prompt_mapping]
        self.token_mapping.update_(torch.tensor(tokens, dtype=torch.int32).to(self.device, non_blocking=True))
        self.sampler_mapping.update_(torch.tensor(samples, dtype=torch.int32).to(self.device, non_blocking=True))
        self._embeddings_indices[:len(tokens)].copy_(self.token_lora_indices.clamp(min=0) * vocab_size)
        self.is_prefill = bool(mapping.is_prefill)
        self.no_lora = all(t < 0 for t in tokens)

    @property
    def token_lora_indices(self) -> Tensor:
        """[T] int32: each token's slot (-1: none)."""
        return self.token_mapping.slots[:self.token_mapping.num_tokens]

    @property
    def sampler_indices(self) -> Tensor:
        """[rows] int32: each sampled row's slot (-1: none)."""
        return self.sampler_mapping.slots[:self.sampler_mapping.num_tokens]

    def _ids(self, mapping: SlotMapping, rows: int):
        """The mapping itself when it has exactly ``rows`` rows, else its first ``rows`` slots."""
        return mapping if mapping.num_tokens == rows else mapping.slots[:rows]

    def _scale(self, scale, slots: int, device) -> Optional[Tensor]:
        """scale as the ops' [S] scales (None for 1.0, vLLM's usual value: scale folded into B)."""
        if float(scale) == 1.0:
            return None
        key = (float(scale), slots, device)
        if key not in self._scales:
            self._scales[key] = torch.full((slots,), float(scale), dtype=torch.float32, device=device)
        return self._scales[key]

    def add_shrink(self, y: Tensor, x: Tensor, lora_a_stacked, scale: float, **kwargs) -> None:
        """y [n, T, r_max] fp32 ← scale·x·A_iᵀ per slice (written, not accumulated: vLLM zeroes it)."""
        x = x.reshape(-1, x.shape[-1])
        a = _slices("lora_a_stacked", lora_a_stacked)
        lora_shrink(x, a, self._ids(self.token_mapping, x.shape[0]),
                    scales=self._scale(scale, a[0].shape[0], x.device), out=y, validate_ids=False)

    def add_expand(self, y: Tensor, x: Tensor, lora_b_stacked, output_slices: tuple, offset_start: int = 0,
                   add_inputs: bool = True, **kwargs) -> None:
        """y[:, offset_start + o_i : … + N_i] += x[i]·B_iᵀ; x [n, T, r_max] (the shrink buffer)."""
        y2 = y.view(-1, y.shape[-1])
        lora_expand(y2, x, _slices("lora_b_stacked", lora_b_stacked), self._ids(self.token_mapping, y2.shape[0]),
                    output_slices=tuple(output_slices), offset=offset_start, add=True, validate_ids=False)

    def add_lora_embedding(self, y: Tensor, x: Tensor, lora_b_stacked: Tensor, add_inputs: bool = True,
                           **kwargs) -> None:
        """y (+)= x·Bᵀ per token: x [T, r_max] the looked-up A rows, lora_b_stacked [S, 1, D, r_max]."""
        lora_expand(y, x[None], _slices("lora_b_stacked", lora_b_stacked), self._ids(self.token_mapping, y.shape[0]),
                    add=bool(add_inputs), validate_ids=False)

    def add_lora_linear(self, y: Tensor, x: Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices: tuple, *, buffer=None, **kwargs) -> None:
        """y += scale·(x·A_iᵀ)·B_iᵀ for every slice, in one :func:`adaptkern.add_lora_delta` call
        (one launch at decode sizes; no fp32 buffer round trip)."""
        if "lora_bias_stacked" in kwargs and kwargs["lora_bias_stacked"] is not None:
            raise NotImplementedError("LoRA biases are not supported by the adaptkern punica wrapper")
        y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        a = _slices("lora_a_stacked", lora_a_stacked)
        add_lora_delta(y2, x2, a, _slices("lora_b_stacked", lora_b_stacked), self._ids(self.token_mapping, x2.shape[0]),
                       scales=self._scale(scale, a[0].shape[0], x.device), output_slices=tuple(output_slices),
                       validate_ids=False)

    def add_lora_logits(self, y: Tensor, x: Tensor, lora_a_stacked: Tensor, lora_b_stacked: Tensor, scale, *,
                        buffer=None, **kwargs) -> None:
        """y[:, :V] += scale·(x·Aᵀ)·Bᵀ per sampled row: lora_a_stacked [S, 1, r, H], lora_b_stacked [S, 1, V, r]."""
        y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        a = _slices("lora_a_stacked", lora_a_stacked)
        add_lora_delta(y2, x2, a, _slices("lora_b_stacked", lora_b_stacked),
                       self._ids(self.sampler_mapping, x2.shape[0]), scales=self._scale(scale, a[0].shape[0], x.device),
                       validate_ids=False)


def register() -> None:
    """vLLM general plug-in: make the current platform resolve its punica wrapper to
    :class:`AdaptkernPunicaWrapper` (vLLM instantiates it by qualified name)."""
    from vllm.platforms import current_platform

    type(current_platform).get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)

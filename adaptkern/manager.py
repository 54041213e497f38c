"""``AdapterManager``: many LoRA adapters in host memory, served from a fixed number of device slots.

Each ``AdapterLinear`` of the model gets one :class:`~adaptkern.pool.AdapterPool` of
``num_slots`` slots; an adapter occupies the same slot in every layer, so one id per row
serves the whole model. Loading an adapter writes its slot once; a step reads the pools as
they are, so its cost does not depend on how many adapters the manager holds.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import validation as check
from .nn import AdapterLinear
from .pool import AdapterPool

__all__ = ["AdapterManager"]


class AdapterManager:
    """LoRA adapters of a model held in host memory, at most ``num_slots`` of them on the device.

    Semantics: inside ``with manager.batch(names):`` row b of every forward (sequence b of a
    [B, T, K] input; generate's expanded batches included) computes, in every AdapterLinear,
    y_b = x_b·Wᵀ + b + scale·(x_b·Aᵀ)·Bᵀ with the (A, B, scale) adapter ``names[b]`` gave that
    layer; None, or a layer the adapter does not target: the base alone. The layers' own
    adapters are not used inside the block.

    Slots: a batch's adapters that are not on the device are loaded into free slots, else into
    the slots of the least recently used adapters that are neither pinned nor in the batch.
    A batch naming more adapters than there are slots to give it is a ValueError, raised
    before anything changes. Host copies are pinned when CUDA is available; loads run on a
    side stream per device, after the compute already queued (so a slot is never rewritten
    under a kernel still reading it), and each layer's forward waits only for its own
    copies: the loads of later layers overlap the compute of earlier ones. On a CPU the same
    code copies synchronously.

    Shapes: the weights of adapter ``name`` for layer ``path`` (a module name of the model):
    lora_a [r, in_features], lora_b [out_features, r], 1 ≤ r ≤ ``max_rank``; stored in the
    layer's dtype.
    """

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, *, pin_memory: Optional[bool] = None):
        self.num_slots = check.positive_int("num_slots", num_slots)
        self.max_rank = check.positive_int("max_rank", max_rank)
        self.layers = {path: m for path, m in model.named_modules() if isinstance(m, AdapterLinear)}
        if not self.layers:
            raise ValueError(f"{type(model).__name__} holds no AdapterLinear layers (patch it first: adaptkern.patch)")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.pools = {path: AdapterPool(m.in_features, m.out_features, num_slots, max_rank, dtype=m.weight.dtype,
                                        device=m.weight.device) for path, m in self.layers.items()}
        self._host: dict[str, dict[str, tuple[Tensor, Tensor, float]]] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._pinned: set[str] = set()
        self._streams: dict[torch.device, object] = {}
        self._ready: dict[str, object] = {}  # layer path -> CUDA event after its latest slot writes

    # -- adapters in host memory ------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """Names of every adapter the manager holds, on the device or not."""
        return list(self._host)

    @property
    def resident(self) -> dict[str, int]:
        """Adapter name -> device slot, least recently used first."""
        return dict(self._resident)

    @property
    def pinned(self) -> set[str]:
        """Adapters that stay on the device until unpinned."""
        return set(self._pinned)

    def add_lora(self, name: str, weights: Mapping[str, tuple], scale: Union[float, Mapping[str, float]]) -> None:
        """Hold LoRA adapter ``name``: ``weights`` maps a layer path to (lora_a [r, in], lora_b [out, r]);
        ``scale`` (alpha/r) is one number or one per layer path. Every argument is checked (shapes,
        ranks, finite values) before anything is stored; nothing is copied to the device yet."""
        check.adapter_name(name)
        if name in self._host:
            raise ValueError(f"the manager already holds an adapter named {name!r}; remove() it first")
        if not isinstance(weights, Mapping) or not weights:
            raise TypeError(f"weights must be a non-empty mapping of layer path -> (lora_a, lora_b), got {weights!r}")
        host = {}
        for path, pair in weights.items():
            if path not in self.layers:
                raise ValueError(f"{path!r} is not an AdapterLinear of the model; layers: {sorted(self.layers)}")
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"weights[{path!r}] must be a pair (lora_a, lora_b)")
            s = scale[path] if isinstance(scale, Mapping) and path in scale else scale
            if isinstance(s, Mapping):
                raise ValueError(f"scale has no entry for layer {path!r}")
            host[path] = self._host_pair(path, *pair, check.real(f"scale of {path!r}", s))
        self._host[name] = host

    def add_from_layers(self, name: str) -> None:
        """Hold a copy of LoRA adapter ``name`` as the model's layers hold it now (added with
        ``add_lora``, loaded with ``load_peft``, trained, ...), each layer with its own scale."""
        found = {p: m.adapters[name] for p, m in self.layers.items() if name in m.adapters}
        if not found:
            raise ValueError(f"no AdapterLinear of the model holds an adapter named {name!r}")
        kinds = {a.kind for a in found.values()}
        if kinds != {"lora"}:
            raise ValueError(f"adapter {name!r} is not LoRA in every layer ({sorted(kinds)}); the manager serves LoRA")
        self.add_lora(name, {p: (a.lora_A, a.lora_B) for p, a in found.items()},
                      {p: a.scale for p, a in found.items()})

    def _host_pair(self, path: str, lora_a, lora_b, scale: float) -> tuple[Tensor, Tensor, float]:
        layer = self.layers[path]
        a = check.tensor(f"lora_a of {path!r}", lora_a, 2)
        b = check.tensor(f"lora_b of {path!r}", lora_b, 2)
        r = a.shape[0]
        if not 1 <= r <= self.max_rank or tuple(a.shape) != (r, layer.in_features) or \
                tuple(b.shape) != (layer.out_features, r):
            raise ValueError(f"layer {path!r} needs lora_a [r, {layer.in_features}] and lora_b "
                             f"[{layer.out_features}, r] with 1 <= r <= max_rank={self.max_rank}, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        dtype = layer.weight.dtype
        a, b = (t.detach().to("cpu", dtype).contiguous() for t in (a, b))
        for what, t in (("lora_a", a), ("lora_b", b)):
            check.finite_tensor(f"{what} of {path!r} in {dtype}", t)
        if self.pin_memory:
            a, b = a.pin_memory(), b.pin_memory()
        return a, b, scale

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` (pinned or not); its device slot, if any, becomes free."""
        self._known(name)
        if name in self._resident:
            slot = self._resident.pop(name)
            for path, pool in self.pools.items():
                with self._on_side_stream(path):
                    pool.evict(slot)
        self._pinned.discard(name)
        del self._host[name]

    def _known(self, name) -> str:
        if name not in self._host:
            raise ValueError(f"unknown adapter {name!r}; the manager holds {sorted(self._host)}")
        return name

    # -- device slots --------------------------------------------------------------------------

    def pin(self, name: str) -> None:
        """Load adapter ``name`` now if needed and keep it on the device until :meth:`unpin`."""
        self._known(name)
        if name not in self._pinned and name not in self._resident and len(self._pinned) >= self.num_slots:
            raise ValueError(f"all {self.num_slots} slots hold pinned adapters {sorted(self._pinned)}; unpin one first")
        self.prefetch([name])
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        """Let adapter ``name`` be evicted again (it stays loaded until its slot is needed)."""
        self._known(name)
        self._pinned.discard(name)

    def prefetch(self, names: Sequence[Optional[str]]) -> dict[str, int]:
        """Start loading the adapters ``names`` names (None entries ignored) that are not on the
        device, evicting as :meth:`batch` does; returns name -> slot. On CUDA the copies run
        asynchronously on the side stream: call this a step ahead to hide them."""
        wanted = self._plan(names)
        missing = [n for n in wanted if n not in self._resident]
        used = set(self._resident.values())
        free = [s for s in range(self.num_slots) if s not in used]
        victims = [n for n in self._resident if n not in wanted and n not in self._pinned]
        for name in missing:
            slot = free.pop(0) if free else self._resident.pop(victims.pop(0))
            self._load(name, slot)
            self._resident[name] = slot
        for name in wanted:
            self._resident.move_to_end(name)
        return {n: self._resident[n] for n in wanted}

    def _plan(self, names) -> list[str]:
        """The distinct adapters of ``names``, after checking that they fit: nothing changes here."""
        if isinstance(names, str) or not all(n is None or isinstance(n, str) for n in names):
            raise TypeError(f"names must be a sequence of adapter names or None, got {names!r}")
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        for n in wanted:
            self._known(n)
        if len(wanted) > self.num_slots:
            raise ValueError(f"one batch names {len(wanted)} adapters but the manager has {self.num_slots} device "
                             f"slots; split the batch or build the manager with more slots")
        missing = sum(n not in self._resident for n in wanted)
        held = [n for n in self._pinned if n not in wanted]
        if missing > self.num_slots - len(self._resident) + sum(
                n not in wanted and n not in self._pinned for n in self._resident):
            raise ValueError(f"one batch names {len(wanted)} adapters but only {self.num_slots - len(held)} of the "
                             f"{self.num_slots} device slots are not held by pinned adapters {sorted(held)}; unpin "
                             f"some or split the batch")
        return wanted

    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @contextlib.contextmanager
    def _on_side_stream(self, path: str):
        """Slot writes of layer ``path``: on CUDA on the side stream, after the compute queued so
        far, then recorded in the layer's ready event; on a CPU in place."""
        stream = self._side_stream(self.pools[path].device)
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            yield
            self._ready[path] = torch.cuda.Event()
            self._ready[path].record(stream)

    def _load(self, name: str, slot: int) -> None:
        """Write adapter ``name`` into ``slot`` of every pool (empty where it has no weights)."""
        weights = self._host[name]
        for path, pool in self.pools.items():
            with self._on_side_stream(path):
                if path in weights:
                    a, b, scale = weights[path]
                    pool.load_lora(slot, a, b, scale, validate_values=False, non_blocking=self.pin_memory)
                elif pool.kinds[slot] is not None:
                    pool.evict(slot)

    @contextlib.contextmanager
    def batch(self, names: Sequence[Optional[str]]):
        """Within the block, row b of every batch (sequence b of a [B, T, K] input) uses adapter
        ``names[b]`` (None: base only) in every layer it targets.

        Loads what is missing (see the class docstring), marks the batch's adapters most
        recently used, and binds every layer to its pool (:meth:`AdapterLinear.serving`) with
        one id per row: inside the block a forward does no work on the pools.
        """
        slots = self.prefetch(names)
        ids = {}
        with contextlib.ExitStack() as stack:
            for path, layer in self.layers.items():
                device = layer.weight.device
                if device not in ids:
                    ids[device] = torch.tensor([-1 if n is None else slots[n] for n in names], dtype=torch.int32,
                                               device=device)
                stack.enter_context(layer.serving(self.pools[path], ids[device], self._ready.get(path)))
            yield self

    def __repr__(self) -> str:
        return (f"AdapterManager(layers={len(self.layers)}, slots={len(self._resident)}/{self.num_slots} used, "
                f"adapters={len(self._host)}, pinned={sorted(self._pinned)}, max_rank={self.max_rank})")

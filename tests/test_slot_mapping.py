"""``SlotMapping``: preallocated batch metadata refilled in place, accepted by every mixed op."""

import os

import pytest
import torch

from adaptkern.mixed import mixed_adapter_linear, mixed_lora_linear
from adaptkern.ops.mixed_adapter_linear import rows
from adaptkern.pool import AdapterPool
from adaptkern.serving import add_lora_delta
from adaptkern.slot_mapping import SlotMapping


def test_update_refills_in_place_with_the_documented_metadata():
    mapping = SlotMapping.empty(8, 4)
    ptrs = [t.data_ptr() for t in (mapping.slots, mapping.sorted_rows, mapping.counts, mapping.offsets,
                                   mapping.active_slots, mapping.num_active)]
    assert mapping.num_tokens == 0 and mapping.num_active.tolist() == [0]
    mapping.update_(torch.tensor([2, -1, 0, 2, 3, 2]))
    assert mapping.slots.tolist() == [2, -1, 0, 2, 3, 2, -1, -1]
    assert mapping.sorted_rows.tolist() == [2, 0, 3, 5, 4, 1, -1, -1]
    assert mapping.counts.tolist() == [1, 0, 3, 1] and mapping.offsets.tolist() == [0, 1, 1, 4, 5]
    assert mapping.active_slots.tolist() == [0, 2, 3, -1] and mapping.num_active.tolist() == [3]
    mapping.update_([1, 7, -9], validate=False)  # unchecked ids outside [0, S) read as -1
    assert mapping.num_tokens == 3 and mapping.slots.tolist() == [1, -1, -1] + [-1] * 5
    assert mapping.active_slots.tolist() == [1, -1, -1, -1] and mapping.offsets.tolist() == [0, 0, 1, 1, 1]
    assert ptrs == [t.data_ptr() for t in (mapping.slots, mapping.sorted_rows, mapping.counts, mapping.offsets,
                                           mapping.active_slots, mapping.num_active)]


def native_calls(fn, *args) -> int:
    """Calls of the native metadata op in ``fn(*args)`` (the profiler also sees ops that compiled code runs)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return [e.name for e in prof.events()].count("adaptkern_native::slot_mapping_update_")


def metadata(mapping: SlotMapping) -> list:
    return [t.tolist() for t in (mapping.slots, mapping.sorted_rows, mapping.counts, mapping.offsets,
                                 mapping.active_slots, mapping.num_active)]


def pytorch_metadata(ids: torch.Tensor, max_tokens: int, num_slots: int) -> list:
    meta = rows.write_slot_metadata_(ids, rows.slot_metadata_buffers(max_tokens, num_slots, ids.device))
    return [t.tolist() for t in meta]


@pytest.mark.skipif(os.environ.get("ADAPTKERN_NO_NATIVE", "") not in ("", "0"), reason="ADAPTKERN_NO_NATIVE is set")
def test_update_is_one_native_call_with_the_pytorch_bits():
    assert rows.native_available("cpu"), f"the native slot metadata op did not build: {rows._NATIVE_ERROR}"
    mapping = SlotMapping.empty(300, 7)
    for ids in (torch.randint(-1, 7, (300,)), torch.full((5,), 6, dtype=torch.int32), torch.zeros(0, dtype=torch.long)):
        assert native_calls(mapping.update_, ids) == 1
        assert metadata(mapping) == pytorch_metadata(ids, 300, 7)


@pytest.mark.skipif(os.environ.get("ADAPTKERN_NO_NATIVE", "") not in ("", "0"), reason="ADAPTKERN_NO_NATIVE is set")
def test_update_compiles_fullgraph_around_the_native_op():
    """torch.compile keeps update_ in one graph (the custom op has a fake); the compiled call runs the C++ op."""
    mapping = SlotMapping.empty(16, 4)
    fn = torch.compile(lambda ids: mapping.update_(ids, validate=False).sorted_rows, fullgraph=True,
                       backend="aot_eager")
    for ids in (torch.tensor([2, -1, 0, 2, 3, 2]), torch.tensor([1, 1, 0, 9, 3, 2, 0, 0], dtype=torch.int32)):
        assert native_calls(fn, ids) == 1
        assert mapping.num_tokens == len(ids) and metadata(mapping) == pytorch_metadata(ids, 16, 4)


def test_errors_before_any_change():
    mapping = SlotMapping.empty(4, 3).update_(torch.tensor([0, 1]))
    for bad, exc, pattern in [
        (torch.tensor([0, 1, 2, 0, 1]), ValueError, r"M=5 rows, more than the mapping's max_tokens=4"),
        (torch.tensor([0, 3]), ValueError, r"adapter_ids\[1\] = 3 is out of range"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        (torch.tensor([0.0]), TypeError, "int32 or int64"),
        (torch.tensor(1), ValueError, r"adapter_ids must be 1-D \[M\], got shape \(\)"),
        (None, TypeError, "adapter_ids must be a torch.Tensor or a list of ints, got NoneType"),
        (3, TypeError, "adapter_ids must be a torch.Tensor or a list of ints, got int"),
        ("01", TypeError, "adapter_ids must be a torch.Tensor or a list of ints, got str"),
        (range(2), TypeError, "adapter_ids must be a torch.Tensor or a list of ints, got range"),
        ([0, 1.5], TypeError, "adapter_ids as a list must hold ints"),
    ]:
        with pytest.raises(exc, match=pattern):
            mapping.update_(bad)
        assert mapping.num_tokens == 2 and mapping.slots.tolist() == [0, 1, -1, -1]
    for bad, exc in ((None, TypeError), (torch.tensor(2), ValueError)):
        with pytest.raises(exc, match="adapter_ids must be"):
            SlotMapping.from_ids(bad, 3)
    with pytest.raises(ValueError, match="max_tokens"):
        SlotMapping.empty(-1, 3)
    with pytest.raises(ValueError, match="num_slots"):
        SlotMapping.empty(4, 0)


def test_every_mixed_op_checks_the_mapping_against_its_inputs():
    x, w = torch.randn(2, 6), torch.randn(5, 6)
    a, b = torch.randn(3, 2, 6), torch.randn(3, 5, 2)
    with pytest.raises(ValueError, match="SlotMapping is for 4 slots but the adapter stacks have S=3"):
        mixed_lora_linear(x, w, None, a, b, SlotMapping.from_ids(torch.tensor([0, 1]), 4))
    with pytest.raises(ValueError, match="holds M=3 rows"):
        mixed_lora_linear(x, w, None, a, b, SlotMapping.from_ids(torch.tensor([0, 1, 2]), 3))
    pool = AdapterPool(6, 5, num_slots=3, max_rank=2)
    pool.load_lora(1, torch.randn(2, 6), torch.randn(5, 2), scale=2.0)
    ids = torch.tensor([1, -1])
    assert torch.equal(mixed_adapter_linear(x, w, None, pool, SlotMapping.from_ids(ids, 3)),
                       mixed_adapter_linear(x, w, None, pool, ids))


@pytest.mark.gpu
def test_cuda_graph_captured_once_replays_any_mapping():
    """One capture; each replay gets a new mapping (and a new number of active adapters) through update_."""
    gen = torch.Generator().manual_seed(0)
    m, k, s, r, widths = 64, 512, 16, 16, (512, 128, 128)
    dev, bf = "cuda", torch.bfloat16
    rnd = lambda *shape: (torch.randn(*shape, generator=gen) * 0.05).to(dev, bf)  # noqa: E731
    x, w = rnd(m, k), rnd(sum(widths), k)
    a, b = [rnd(s, r, k) for _ in widths], [rnd(s, n, r) for n in widths]
    scales, ranks = torch.rand(s, generator=gen).to(dev), torch.randint(0, r + 1, (s,), generator=gen).to(dev)
    mapping = SlotMapping.empty(m, s, device=dev)
    static_ids = torch.full((m,), -1, dtype=torch.int32, device=dev)
    y_delta = torch.zeros(m, 1024, dtype=bf, device=dev)

    def step():
        mapping.update_(static_ids, validate=False)
        y = mixed_lora_linear(x, w, None, a, b, mapping, scales=scales, ranks=ranks, output_slices=widths,
                              validate_ids=False)
        y_delta.zero_()
        add_lora_delta(y_delta, x, a, b, mapping, scales=scales, ranks=ranks, offset=128, validate_ids=False)
        return y

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    for active in (1, 5, 16, 0):
        ids = torch.randint(-1, active, (m,), generator=gen, dtype=torch.int32) if active else torch.full((m,), -1)
        static_ids.copy_(ids)
        graph.replay()
        torch.cuda.synchronize()
        want = mixed_lora_linear(x, w, None, a, b, ids.to(dev), scales=scales, ranks=ranks, output_slices=widths)
        assert torch.equal(static_y, want)
        want_delta = torch.zeros_like(y_delta)
        add_lora_delta(want_delta, x, a, b, ids.to(dev), scales=scales, ranks=ranks, offset=128)
        assert torch.equal(y_delta, want_delta)
        assert int(mapping.num_active) == len(set(ids.tolist()) - {-1})


@pytest.mark.gpu
def test_cuda_graph_replays_the_native_update():
    """The native update captured alone: every replay rewrites all six buffers as the PyTorch producer would."""
    assert rows.native_available("cuda"), f"the CUDA build failed: {rows._NATIVE_ERROR}"
    gen = torch.Generator().manual_seed(1)
    m, s = 3000, 40
    mapping = SlotMapping.empty(m + 100, s, device="cuda")
    static_ids = torch.full((m,), -1, dtype=torch.int64, device="cuda")
    mapping.update_(static_ids, validate=False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mapping.update_(static_ids, validate=False)
    for ids in (torch.randint(-1, s, (m,), generator=gen), torch.randint(-9, s + 9, (m,), generator=gen),
                torch.full((m,), s - 1), torch.full((m,), -1)):
        static_ids.copy_(ids)
        graph.replay()
        torch.cuda.synchronize()
        assert metadata(mapping) == pytorch_metadata(ids, m + 100, s)

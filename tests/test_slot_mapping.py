"""``SlotMapping``: preallocated batch metadata refilled in place, accepted by every mixed op."""

import pytest
import torch

from adaptkern.mixed import mixed_adapter_linear, mixed_lora_linear
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


def test_errors_before_any_change():
    mapping = SlotMapping.empty(4, 3).update_(torch.tensor([0, 1]))
    for bad, exc, pattern in [
        (torch.tensor([0, 1, 2, 0, 1]), ValueError, r"M=5 rows, more than the mapping's max_tokens=4"),
        (torch.tensor([0, 3]), ValueError, r"adapter_ids\[1\] = 3 is out of range"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        (torch.tensor([0.0]), TypeError, "int32 or int64"),
    ]:
        with pytest.raises(exc, match=pattern):
            mapping.update_(bad)
        assert mapping.num_tokens == 2 and mapping.slots.tolist() == [0, 1, -1, -1]
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

// SlotMapping metadata in one call: schema, argument checks, C++ CPU kernel.
//
// Semantics (the PyTorch producer write_slot_metadata_ in
// adaptkern/ops/mixed_adapter_linear/rows.py is the spec; both give identical bits):
//   M rows, S = counts.numel() slots; row i's bin is ids[i] if 0 <= ids[i] < S, else S (base only)
//   slots[i]        = bin < S ? bin : -1             (i >= M: -1)
//   counts[s]       = rows in bin s;  offsets[s] = counts[0] + ... + counts[s-1]  (offsets[S]: rows with a slot)
//   sorted_rows     = rows ordered by bin, ascending within a bin (stable)  (positions >= M: -1)
//   active_slots    = slots with counts > 0, ascending, then -1;  num_active[0] = their number
//
//   torch.ops.adaptkern_native.slot_mapping_update_(adapter_ids, slots, sorted_rows, counts,
//                                                   offsets, active_slots, num_active)
// writes every entry of the six int32 buffers in place (fixed addresses: CUDA-graph friendly).
// The CUDA kernel is in slot_mapping_cuda.cu (same schema).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace adaptkern_native {

// Metadata-only checks shared by the CPU and CUDA kernels (no sync). Returns S.
int64_t check_slot_mapping_args(const at::Tensor& ids, const at::Tensor& slots, const at::Tensor& sorted_rows,
                                const at::Tensor& counts, const at::Tensor& offsets,
                                const at::Tensor& active_slots, const at::Tensor& num_active) {
  TORCH_CHECK(ids.dim() == 1, "slot_mapping_update_: adapter_ids must be 1-D [M], got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "slot_mapping_update_: adapter_ids must be int32 or int64, got ", ids.scalar_type());
  const at::Tensor* outs[6] = {&slots, &sorted_rows, &counts, &offsets, &active_slots, &num_active};
  const char* names[6] = {"slots", "sorted_rows", "counts", "offsets", "active_slots", "num_active"};
  for (int k = 0; k < 6; ++k) {
    const at::Tensor& t = *outs[k];
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kInt && t.is_contiguous(), "slot_mapping_update_: ",
                names[k], " must be a contiguous 1-D int32 tensor, got ", t.scalar_type(), " shape ",
                t.sizes(), " strides ", t.strides());
    TORCH_CHECK(t.device() == ids.device(), "slot_mapping_update_: ", names[k], " is on ", t.device(),
                " but adapter_ids is on ", ids.device());
  }
  const int64_t m = ids.numel(), max_tokens = slots.numel(), s = counts.numel();
  TORCH_CHECK(s >= 1, "slot_mapping_update_: counts must have shape [S] with S >= 1, got ", counts.sizes());
  TORCH_CHECK(sorted_rows.numel() == max_tokens, "slot_mapping_update_: sorted_rows has shape ",
              sorted_rows.sizes(), " but slots has shape ", slots.sizes(), " (both [max_tokens])");
  TORCH_CHECK(m <= max_tokens, "slot_mapping_update_: adapter_ids has M=", m,
              " rows, more than the buffers' max_tokens=", max_tokens);
  TORCH_CHECK(max_tokens < INT32_MAX, "slot_mapping_update_: max_tokens=", max_tokens,
              " is too large for int32 row indices");
  TORCH_CHECK(offsets.numel() == s + 1 && active_slots.numel() == s && num_active.numel() == 1,
              "slot_mapping_update_: for counts [S] = ", counts.sizes(), " expected offsets [S + 1], ",
              "active_slots [S], num_active [1], got ", offsets.sizes(), ", ", active_slots.sizes(), ", ",
              num_active.sizes());
  return s;
}

namespace {

// Stable counting sort, O(M + S): histogram of bins (and each row's slot) -> exclusive scan of the
// bin sizes (counts, offsets, active slots) -> scatter of the rows in ascending order. ids are read
// by the first pass only; the scatter reads slots, so ids may alias slots.
template <typename index_t>
void slot_mapping_cpu_kernel(const index_t* ids, int64_t m, int64_t s, int64_t max_tokens,
                             int32_t* slots,         // [max_tokens]
                             int32_t* sorted_rows,   // [max_tokens]
                             int32_t* counts,        // [S]
                             int32_t* offsets,       // [S + 1]
                             int32_t* active_slots,  // [S]
                             int32_t* num_active) {  // [1]
  std::vector<int64_t> cursor(s + 1, 0);  // bin sizes, then each bin's next free position
  for (int64_t i = 0; i < m; ++i) {
    const int64_t bin = (ids[i] >= 0 && static_cast<int64_t>(ids[i]) < s) ? static_cast<int64_t>(ids[i]) : s;
    slots[i] = bin < s ? static_cast<int32_t>(bin) : -1;
    cursor[bin] += 1;
  }
  std::fill(slots + m, slots + max_tokens, -1);
  int64_t start = 0, active = 0;
  for (int64_t b = 0; b <= s; ++b) {
    const int64_t n = cursor[b];
    offsets[b] = static_cast<int32_t>(start);  // b == S: rows with a slot
    if (b < s) {
      counts[b] = static_cast<int32_t>(n);
      if (n > 0) active_slots[active++] = static_cast<int32_t>(b);
    }
    cursor[b] = start;
    start += n;
  }
  std::fill(active_slots + active, active_slots + s, -1);
  num_active[0] = static_cast<int32_t>(active);
  for (int64_t i = 0; i < m; ++i) sorted_rows[cursor[slots[i] < 0 ? s : slots[i]]++] = static_cast<int32_t>(i);
  std::fill(sorted_rows + m, sorted_rows + max_tokens, -1);
}

void slot_mapping_update_cpu(const at::Tensor& adapter_ids, const at::Tensor& slots, const at::Tensor& sorted_rows,
                             const at::Tensor& counts, const at::Tensor& offsets, const at::Tensor& active_slots,
                             const at::Tensor& num_active) {
  const int64_t s = check_slot_mapping_args(adapter_ids, slots, sorted_rows, counts, offsets, active_slots,
                                            num_active);
  const at::Tensor ids = adapter_ids.contiguous();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "slot_mapping_update_cpu", [&] {
    slot_mapping_cpu_kernel<index_t>(ids.data_ptr<index_t>(), ids.numel(), s, slots.numel(),
                                     slots.data_ptr<int32_t>(), sorted_rows.data_ptr<int32_t>(),
                                     counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                                     active_slots.data_ptr<int32_t>(), num_active.data_ptr<int32_t>());
  });
}

}  // namespace
}  // namespace adaptkern_native

TORCH_LIBRARY(adaptkern_native, m) {
  m.def(
      "slot_mapping_update_(Tensor adapter_ids, Tensor(a!) slots, Tensor(b!) sorted_rows, Tensor(c!) counts, "
      "Tensor(d!) offsets, Tensor(e!) active_slots, Tensor(f!) num_active) -> ()");
}

TORCH_LIBRARY_IMPL(adaptkern_native, CPU, m) {
  m.impl("slot_mapping_update_", &adaptkern_native::slot_mapping_update_cpu);
}

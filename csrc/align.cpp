// Row alignment for mixed-adapter batches: schema + C++ CPU implementation.
//
// Semantics (the Python reference adaptkern/ops/mixed_adapter_linear/rows.py is the spec):
//   rows are binned by adapter slot (bins 0..S-1; rows with id -1, or any id outside
//   [0, S), form the last bin S, written as slot -1); each non-empty bin, in bin order,
//   takes ceil(count / block_m) blocks of block_m entries holding its row indices in
//   ascending order (stable), padded with -1.
//   sorted_rows [max_blocks * block_m] int32  row index per entry, -1 = padding/unused
//   block_slots [max_blocks]           int32  slot of each used block, -1 = base/unused
//   num_blocks  [1]                    int32  number of used blocks
//
// The op writes into caller-provided buffers (fixed size, CUDA-graph friendly):
//   torch.ops.adaptkern_native.align_rows_(ids, num_slots, block_m,
//                                          sorted_rows, block_slots, num_blocks)
// The CUDA implementation lives in align_cuda.cu (registered there, same schema).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace adaptkern_native {

// Shared by the CPU and CUDA implementations: checks that only need metadata (no sync).
void check_align_args(const at::Tensor& ids, int64_t num_slots, int64_t block_m,
                      const at::Tensor& sorted_rows, const at::Tensor& block_slots,
                      const at::Tensor& num_blocks) {
  TORCH_CHECK(ids.dim() == 1, "align_rows_: adapter_ids must be 1-D, got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "align_rows_: adapter_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(num_slots >= 1, "align_rows_: num_slots must be >= 1, got ", num_slots);
  TORCH_CHECK(block_m >= 1, "align_rows_: block_m must be >= 1, got ", block_m);
  TORCH_CHECK(ids.numel() < INT32_MAX, "align_rows_: too many rows for int32 indices: ", ids.numel());
  const at::Tensor* outs[3] = {&sorted_rows, &block_slots, &num_blocks};
  const char* names[3] = {"sorted_rows", "block_slots", "num_blocks"};
  for (int k = 0; k < 3; ++k) {
    const at::Tensor& t = *outs[k];
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kInt && t.is_contiguous(),
                "align_rows_: ", names[k], " must be a contiguous 1-D int32 tensor, got ",
                t.scalar_type(), " shape ", t.sizes());
    TORCH_CHECK(t.device() == ids.device(), "align_rows_: ", names[k], " is on ", t.device(),
                " but adapter_ids is on ", ids.device());
  }
  TORCH_CHECK(num_blocks.numel() == 1, "align_rows_: num_blocks must have shape [1], got ",
              num_blocks.sizes());
  TORCH_CHECK(sorted_rows.numel() == block_slots.numel() * block_m,
              "align_rows_: sorted_rows has ", sorted_rows.numel(), " entries, expected block_slots (",
              block_slots.numel(), ") * block_m (", block_m, ")");
  // Worst case: every bin (num_slots + 1 of them) wastes block_m - 1 entries of padding.
  const int64_t worst = ids.numel() + (num_slots + 1) * (block_m - 1);
  TORCH_CHECK(worst <= sorted_rows.numel(), "align_rows_: buffers hold ", block_slots.numel(),
              " blocks of ", block_m, ", too few for M=", ids.numel(), " rows and num_slots=",
              num_slots);
}

namespace {

// Stable counting sort: histogram -> exclusive scan of padded bin sizes -> in-order scatter.
template <typename index_t>
void align_rows_cpu_kernel(const index_t* ids,  // [M]
                           int64_t M, int64_t S, int64_t block_m,
                           int32_t* sorted_rows,  // [max_blocks * block_m]
                           int32_t* block_slots,  // [max_blocks]
                           int32_t* num_blocks,   // [1]
                           int64_t max_blocks) {
  auto bin_of = [S](index_t id) -> int64_t {
    return (id >= 0 && static_cast<int64_t>(id) < S) ? static_cast<int64_t>(id) : S;
  };
  std::vector<int64_t> cursor(S + 1, 0);  // counts, then the next free entry of each bin
  for (int64_t i = 0; i < M; ++i) cursor[bin_of(ids[i])] += 1;

  std::fill(sorted_rows, sorted_rows + max_blocks * block_m, -1);
  std::fill(block_slots, block_slots + max_blocks, -1);
  int64_t blocks = 0;  // exclusive scan, in blocks
  for (int64_t b = 0; b <= S; ++b) {
    const int64_t nblk = (cursor[b] + block_m - 1) / block_m;
    if (b < S) std::fill(block_slots + blocks, block_slots + blocks + nblk, static_cast<int32_t>(b));
    cursor[b] = blocks * block_m;
    blocks += nblk;
  }
  for (int64_t i = 0; i < M; ++i) sorted_rows[cursor[bin_of(ids[i])]++] = static_cast<int32_t>(i);
  num_blocks[0] = static_cast<int32_t>(blocks);
}

void align_rows_cpu(const at::Tensor& adapter_ids, int64_t num_slots, int64_t block_m,
                    at::Tensor& sorted_rows, at::Tensor& block_slots, at::Tensor& num_blocks) {
  check_align_args(adapter_ids, num_slots, block_m, sorted_rows, block_slots, num_blocks);
  const at::Tensor ids = adapter_ids.contiguous();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "align_rows_cpu", [&] {
    align_rows_cpu_kernel<index_t>(ids.data_ptr<index_t>(), ids.numel(), num_slots, block_m,
                                   sorted_rows.data_ptr<int32_t>(), block_slots.data_ptr<int32_t>(),
                                   num_blocks.data_ptr<int32_t>(), block_slots.numel());
  });
}

}  // namespace
}  // namespace adaptkern_native

TORCH_LIBRARY(adaptkern_native, m) {
  m.def(
      "align_rows_(Tensor adapter_ids, int num_slots, int block_m, Tensor(a!) sorted_rows, "
      "Tensor(b!) block_slots, Tensor(c!) num_blocks) -> ()");
}

TORCH_LIBRARY_IMPL(adaptkern_native, CPU, m) {
  m.impl("align_rows_", &adaptkern_native::align_rows_cpu);
}

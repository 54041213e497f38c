// SlotMapping metadata in one CUDA launch (schema and argument checks in slot_mapping.cpp).
//
// Semantics: exactly those of slot_mapping.cpp (identical bits, stable row order). One block of
// kThreads threads, no host sync, no allocation: capturable in a CUDA graph and replayable with
// new adapter_ids.
//   1. histogram of bins in shared memory (atomics: counts do not depend on order); slots;
//      clear the entries past M
//   2. two cub::BlockScan exclusive sums over contiguous per-thread ranges of bins: each bin's
//      first sorted position (counts, offsets) and each active slot's index (active_slots)
//   3. rows in chunks of kThreads, in order: cub::BlockRadixSort (stable) of (bin, row) per chunk;
//      each sorted run of one bin goes to sorted_rows[cursor[bin] + rank in the run], then the
//      bin's shared cursor moves past it, so rows of a bin stay in ascending order
// Bins live in shared memory next to the sort's scratch: S <= kMaxSlots (larger S: the PyTorch
// producer, chosen in rows.py).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace adaptkern_native {

// Defined in slot_mapping.cpp: metadata-only argument checks shared with the CPU kernel; returns S.
int64_t check_slot_mapping_args(const at::Tensor& ids, const at::Tensor& slots, const at::Tensor& sorted_rows,
                                const at::Tensor& counts, const at::Tensor& offsets,
                                const at::Tensor& active_slots, const at::Tensor& num_active);

namespace {

constexpr int kThreads = 1024;
constexpr int kMaxSlots = 2047;  // rows.py: _CUDA_MAX_SLOTS
using BlockSort = cub::BlockRadixSort<unsigned, kThreads, 1, int>;
using BlockScan = cub::BlockScan<int, kThreads>;
union Scratch {
  typename BlockSort::TempStorage sort;
  typename BlockScan::TempStorage scan;
  unsigned keys[kThreads];
};
static_assert(sizeof(Scratch) + (kMaxSlots + 1) * sizeof(int) <= 48 * 1024,
              "static shared memory over 48 KiB per block");

template <typename index_t>
__global__ void __launch_bounds__(kThreads) slot_mapping_kernel(
    const index_t* __restrict__ ids,  // [M]
    int m, int s, int max_tokens,
    int32_t* __restrict__ slots,         // [max_tokens]
    int32_t* __restrict__ sorted_rows,   // [max_tokens]
    int32_t* __restrict__ counts,        // [S]
    int32_t* __restrict__ offsets,       // [S + 1]
    int32_t* __restrict__ active_slots,  // [S]
    int32_t* __restrict__ num_active) {  // [1]
  __shared__ Scratch tmp;
  __shared__ int cursor[kMaxSlots + 1];  // bin sizes, then each bin's next free position
  const int tid = threadIdx.x;
  const int nbins = s + 1;  // bin S: base-only rows

  // 1. histogram; slots; entries past M
  for (int b = tid; b < nbins; b += kThreads) cursor[b] = 0;
  __syncthreads();
  for (int i = tid; i < max_tokens; i += kThreads) {
    if (i < m) {
      const index_t id = ids[i];
      const int bin = (id >= 0 && id < static_cast<index_t>(s)) ? static_cast<int>(id) : s;
      slots[i] = bin < s ? bin : -1;
      atomicAdd(&cursor[bin], 1);
    } else {
      slots[i] = -1;
      sorted_rows[i] = -1;
    }
  }
  __syncthreads();

  // 2. thread t owns bins [lo, hi): ranges in thread order are bins in bin order
  const int per = (nbins + kThreads - 1) / kThreads;
  const int lo = min(tid * per, nbins), hi = min(lo + per, nbins);
  int rows_here = 0, active_here = 0;
  for (int b = lo; b < hi; ++b) {
    rows_here += cursor[b];
    active_here += (b < s && cursor[b] > 0);
  }
  int active_pos = 0, total_active = 0, row_pos = 0;
  BlockScan(tmp.scan).ExclusiveSum(active_here, active_pos, total_active);
  __syncthreads();  // the second scan reuses the scratch
  BlockScan(tmp.scan).ExclusiveSum(rows_here, row_pos);
  for (int b = lo; b < hi; ++b) {
    const int n = cursor[b];
    offsets[b] = row_pos;  // b == S: rows with a slot
    if (b < s) {
      counts[b] = n;
      if (n > 0) active_slots[active_pos++] = b;
    }
    cursor[b] = row_pos;
    row_pos += n;
  }
  for (int a = total_active + tid; a < s; a += kThreads) active_slots[a] = -1;
  if (tid == 0) num_active[0] = total_active;
  __syncthreads();  // cursors final; the sort reuses the scratch

  // 3. stable scatter, kThreads rows at a time; key nbins marks threads past M (sorted last)
  const int end_bit = 32 - __clz(nbins);
  for (int base = 0; base < m; base += kThreads) {  // m is uniform: every thread meets every barrier
    const int i = base + tid;
    unsigned key[1] = {i < m ? static_cast<unsigned>(slots[i] < 0 ? s : slots[i]) : static_cast<unsigned>(nbins)};
    int row[1] = {i};
    BlockSort(tmp.sort).Sort(key, row, 0, end_bit);  // thread j: the j-th (bin, row) of the chunk
    __syncthreads();
    tmp.keys[tid] = key[0];
    __syncthreads();
    const int bin = static_cast<int>(key[0]);
    const bool valid = bin < nbins;
    const bool head = valid && (tid == 0 || tmp.keys[tid - 1] != key[0]);
    const bool tail = valid && (tid == kThreads - 1 || tmp.keys[tid + 1] != key[0]);
    if (head) cursor[bin] -= tid;  // the run of `bin` starts at thread tid: rank in run = j - tid
    __syncthreads();
    if (valid) sorted_rows[cursor[bin] + tid] = row[0];
    __syncthreads();
    if (tail) cursor[bin] += tid + 1;  // back to the old cursor plus the run's length
    __syncthreads();
  }
}

void slot_mapping_update_cuda(const at::Tensor& adapter_ids, const at::Tensor& slots, const at::Tensor& sorted_rows,
                              const at::Tensor& counts, const at::Tensor& offsets, const at::Tensor& active_slots,
                              const at::Tensor& num_active) {
  const int64_t s = check_slot_mapping_args(adapter_ids, slots, sorted_rows, counts, offsets, active_slots,
                                            num_active);
  TORCH_CHECK(s <= kMaxSlots, "slot_mapping_update_ (CUDA): counts has S=", s,
              " slots; the CUDA kernel holds at most ", kMaxSlots, " (one shared-memory histogram)");
  const c10::cuda::CUDAGuard guard(adapter_ids.device());
  const at::Tensor ids = adapter_ids.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "slot_mapping_update_cuda", [&] {
    slot_mapping_kernel<index_t><<<1, kThreads, 0, stream>>>(
        ids.data_ptr<index_t>(), static_cast<int>(ids.numel()), static_cast<int>(s),
        static_cast<int>(slots.numel()), slots.data_ptr<int32_t>(), sorted_rows.data_ptr<int32_t>(),
        counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), active_slots.data_ptr<int32_t>(),
        num_active.data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace adaptkern_native

TORCH_LIBRARY_IMPL(adaptkern_native, CUDA, m) {
  m.impl("slot_mapping_update_", &adaptkern_native::slot_mapping_update_cuda);
}

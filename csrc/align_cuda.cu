// Row alignment for mixed-adapter batches: CUDA implementation (schema in align.cpp).
//
// Semantics: as align.cpp / adaptkern.ops.alignment.align_rows_reference, except that the
// order of rows *within* a bin is unspecified (the scatter uses shared-memory atomics).
// Bins, padding, block_slots and num_blocks are identical to the reference.
//
// One launch of one thread block (kThreads threads), no host synchronisation, no
// allocation: capturable in a CUDA graph and replayable with new adapter_ids.
//   1. fill sorted_rows with -1; zero a shared histogram cursor[S + 1]
//   2. histogram of bins (shared atomics)
//   3. exclusive scan of padded bin sizes (cub::BlockScan over per-thread chunks of bins)
//   4. block_slots[k]: upper_bound of k * block_m in the bin starts
//   5. scatter: sorted_rows[atomicAdd(&cursor[bin], 1)] = row
// Sized for serving batches (M up to ~16k rows, S up to kMaxBins - 1 slots); one block
// keeps it one launch, and at these sizes the launch dominates.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace adaptkern_native {

// Defined in align.cpp: metadata-only argument checks shared with the CPU path.
void check_align_args(const at::Tensor& ids, int64_t num_slots, int64_t block_m,
                      const at::Tensor& sorted_rows, const at::Tensor& block_slots,
                      const at::Tensor& num_blocks);

namespace {

constexpr int kThreads = 1024;
// Shared int32 cursor[S + 1]: 40 KiB at the limit, under the 48 KiB default with cub's scratch.
constexpr int64_t kMaxBins = 10240;
using BlockScan = cub::BlockScan<int, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;
static_assert(sizeof(BlockScan::TempStorage) + kMaxBins * sizeof(int) <= 48 * 1024,
              "shared memory over the default 48 KiB per block");

// Bin of a row: its slot, or S for base-only rows (-1; any out-of-range id lands here too,
// so a bad id can never write out of bounds).
template <typename index_t>
__device__ __forceinline__ int bin_of(index_t id, int S) {
  return (id >= 0 && id < static_cast<index_t>(S)) ? static_cast<int>(id) : S;
}

template <typename index_t>
__global__ void __launch_bounds__(kThreads) align_rows_kernel(
    const index_t* __restrict__ ids,      // [M]
    int M, int S, int block_m,
    int32_t* __restrict__ sorted_rows,    // [max_blocks * block_m]
    int32_t* __restrict__ block_slots,    // [max_blocks]
    int32_t* __restrict__ num_blocks,     // [1]
    int max_blocks) {
  __shared__ typename BlockScan::TempStorage scan_tmp;
  extern __shared__ int cursor[];  // [S + 1]: bin counts, then bin start entries, then next free entry
  const int tid = threadIdx.x;
  const int nbins = S + 1;

  // 1. clear: the histogram, and every output entry (buffers are reused across calls)
  for (int b = tid; b < nbins; b += kThreads) cursor[b] = 0;
  const int n_entries = max_blocks * block_m;  // < INT32_MAX, checked on the host
  for (int e = tid; e < n_entries; e += kThreads) sorted_rows[e] = -1;
  __syncthreads();

  // 2. histogram
  for (int i = tid; i < M; i += kThreads) atomicAdd(&cursor[bin_of(ids[i], S)], 1);
  __syncthreads();

  // 3. exclusive scan of padded bin sizes, in blocks. Thread t owns bins [lo, hi), a
  //    contiguous chunk, so chunks in thread order are bins in bin order.
  const int chunk = (nbins + kThreads - 1) / kThreads;
  const int lo = min(tid * chunk, nbins);
  const int hi = min(lo + chunk, nbins);
  int local = 0;
  for (int b = lo; b < hi; ++b) local += (cursor[b] + block_m - 1) / block_m;
  int prefix = 0, total = 0;
  BlockScan(scan_tmp).ExclusiveSum(local, prefix, total);  // total: block-wide sum, to all threads
  for (int b = lo; b < hi; ++b) {
    const int nblk = (cursor[b] + block_m - 1) / block_m;
    cursor[b] = prefix * block_m;  // first entry of bin b
    prefix += nblk;
  }
  if (tid == 0) num_blocks[0] = total;
  __syncthreads();

  // 4. block k lies in the last bin whose first entry is <= k * block_m (empty bins share
  //    their start with the next bin, so upper_bound skips them).
  for (int k = tid; k < max_blocks; k += kThreads) {
    int slot = -1;
    if (k < total) {
      const int entry = k * block_m;
      int a = 0, z = nbins;  // first bin with start > entry
      while (a < z) {
        const int mid = (a + z) >> 1;
        if (cursor[mid] <= entry) a = mid + 1; else z = mid;
      }
      const int b = a - 1;  // >= 0 since cursor[0] == 0
      slot = b < S ? b : -1;
    }
    block_slots[k] = slot;
  }
  __syncthreads();  // step 5 moves the cursors that step 4 reads

  // 5. scatter rows (order within a bin follows atomic order: unstable)
  for (int i = tid; i < M; i += kThreads) {
    const int pos = atomicAdd(&cursor[bin_of(ids[i], S)], 1);
    sorted_rows[pos] = i;
  }
}

void align_rows_cuda(const at::Tensor& adapter_ids, int64_t num_slots, int64_t block_m,
                     at::Tensor& sorted_rows, at::Tensor& block_slots, at::Tensor& num_blocks) {
  check_align_args(adapter_ids, num_slots, block_m, sorted_rows, block_slots, num_blocks);
  TORCH_CHECK(num_slots + 1 <= kMaxBins, "align_rows_ (CUDA): num_slots must be < ", kMaxBins,
              " (one shared-memory histogram), got ", num_slots);
  TORCH_CHECK(sorted_rows.numel() < INT32_MAX && block_m < INT32_MAX,
              "align_rows_ (CUDA): int32 indexing: sorted_rows has ", sorted_rows.numel(),
              " entries, block_m=", block_m);
  const c10::cuda::CUDAGuard guard(adapter_ids.device());
  const at::Tensor ids = adapter_ids.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t smem = static_cast<size_t>(num_slots + 1) * sizeof(int);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "align_rows_cuda", [&] {
    align_rows_kernel<index_t><<<1, kThreads, smem, stream>>>(
        ids.data_ptr<index_t>(), static_cast<int>(ids.numel()), static_cast<int>(num_slots),
        static_cast<int>(block_m), sorted_rows.data_ptr<int32_t>(),
        block_slots.data_ptr<int32_t>(), num_blocks.data_ptr<int32_t>(),
        static_cast<int>(block_slots.numel()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace adaptkern_native

TORCH_LIBRARY_IMPL(adaptkern_native, CUDA, m) {
  m.impl("align_rows_", &adaptkern_native::align_rows_cuda);
}

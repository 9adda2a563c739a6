// cuda/dispatch.hpp — how many threads a row of logits gets, in one place.
//
// Every row kernel (forward, backward, and the fused step's chunk kernels) is
// a template over its row group: a warp per row, 8 rows a 256-thread block,
// for rows of at most kWarpPerRowMaxVocab values (a 4K row is 128 values a
// lane: enough loads in flight), or the whole 512-thread block per row for
// longer rows (a 128K row would leave a warp reading 4K values alone).
// launch_rows() picks the group and the grid; the caller names the kernel.
// A third constant says whether the kernel is the extended instantiation
// (logit transform, token statistics), so the default path stays the plain one.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "../config.hpp"

namespace kto {
namespace cuda {

/// Rows of at most this many logits go one warp per row; longer rows one block.
constexpr index_t kWarpPerRowMaxVocab = 4096;
constexpr int kBlockPerRowThreads = 512;

namespace detail {

/// The row group of a row length: threads a row, rows a block, and the grid.
struct RowPolicy {
  bool warp_per_row;
  explicit RowPolicy(index_t row_length) : warp_per_row(row_length <= kWarpPerRowMaxVocab) {}
  unsigned threads_per_block() const { return warp_per_row ? 256u : kBlockPerRowThreads; }
  unsigned blocks(index_t rows) const {
    return static_cast<unsigned>(warp_per_row ? (rows + 7) / 8 : rows);
  }
};

/// Calls launch(threads_per_row, rows_per_block, extended, grid, block) with the
/// first three as integral constants, for `rows` rows of `row_length` values
/// (none: no call):
///
///   launch_rows(V, n, extended, [&](auto threads, auto per_block, auto ext, dim3 grid, dim3 block)
///   {
///     kernel<T, decltype(threads)::value, decltype(per_block)::value, decltype(ext)::value>
///         <<<grid, block, 0, s>>>(p);
///   });
template <class Launch>
void launch_rows(index_t row_length, index_t rows, bool extended, Launch&& launch) {
  if (rows <= 0) return;
  const RowPolicy policy(row_length);
  const dim3 grid(policy.blocks(rows)), block(policy.threads_per_block());
  auto with_groups = [&](auto ext) {
    if (policy.warp_per_row) {
      launch(std::integral_constant<int, 32>{}, std::integral_constant<int, 8>{}, ext, grid, block);
    } else {
      launch(std::integral_constant<int, kBlockPerRowThreads>{}, std::integral_constant<int, 1>{},
             ext, grid, block);
    }
  };
  if (extended) {
    with_groups(std::true_type{});
  } else {
    with_groups(std::false_type{});
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace kto

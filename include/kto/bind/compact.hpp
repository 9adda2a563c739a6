// bind/compact.hpp — compact scoring: which rows a fused-linear step multiplies.
//
// Prompt and padding rows (target ignore_index) carry no loss, so a fused-linear
// step need not multiply them by the lm_head: on a typical KTO batch half of the
// GEMM work is prompt. The library plans that on the host — given host copies of a
// batch's targets and offsets (FusedLinearInputs::host_targets, host_offsets) it
// gathers the scored rows (inside a sequence, target ≠ ignore_index) and its GEMMs
// multiply those only. CompactBatch holds the copies in the library's index type,
// whatever integer type the framework keeps ids in (JAX: int32). The library checks
// on the device that the copies match what it reads there (read_status).
#pragma once

#include <vector>

#include "../config.hpp"
#include "arguments.hpp"

namespace kto {
namespace bind {

struct CompactBatch {
  std::vector<index_t> targets;  ///< one id a row, contiguous (the device copy's layout)
  std::vector<index_t> offsets;  ///< B + 1; empty: no compact scoring

  /// Host copies of `rows` targets and `count` + 1 offsets of any integer type.
  template <class I>
  static CompactBatch of(const I* host_targets, index_t rows, const I* host_offsets,
                         index_t count) {
    CompactBatch c;
    c.targets.assign(host_targets, host_targets + rows);
    c.offsets.assign(host_offsets, host_offsets + count + 1);
    return c;
  }

  bool on() const { return !offsets.empty(); }
  const index_t* host_targets() const { return on() ? targets.data() : nullptr; }
  const index_t* host_offsets() const { return on() ? offsets.data() : nullptr; }

  /// `b` with these host copies (compact scoring on); b's device targets must be
  /// contiguous, as these are.
  Batch applied_to(Batch b) const {
    b.host_targets = host_targets();
    b.host_offsets = host_offsets();
    return b;
  }
};

}  // namespace bind
}  // namespace kto

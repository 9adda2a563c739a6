// device_errors.cuh — how kernels report bad input without a host round trip.
//
// A kernel that finds a target id out of range, a non-finite logit or a bad
// offset writes key = (stage << 62) | (index << 5) | kind into one 64-bit word
// with atomicMin. The smallest key wins whatever the thread order, so the
// reported error is deterministic; the host reads the word after the stream
// is synchronised (kto::cuda::read_status). All ones means no error. The stage
// bit ranks a cause before its consequence: a NaN logit (stage 0, forward)
// makes its sequence's log-prob NaN, which the finish (stage 1) would report
// too, with a smaller index; the forward's report is the one that explains it.
#pragma once

#include <kto/config.hpp>

namespace kto {
namespace device {

enum ErrorKind : unsigned {
  kTargetOutOfRange = 1,     ///< index = row
  kNonFiniteLogits = 2,      ///< index = row
  kInvalidOffsets = 3,       ///< index = offset entry
  kNonFiniteInput = 4,       ///< index = sequence (reference / KL log-prob, g_s)
  kInvalidLabel = 5,         ///< index = sequence
  kPeerFailure = 6,          ///< index = failed ranks: another data-parallel rank failed
  kEmptyKlBatch = 7,         ///< index = 0: z0 from a KL batch, but no rank gave an example
  kHostTargetsMismatch = 8,  ///< index = scored rows the device counts: host_targets differ
};
/// OR-ed into the kind by the KL batch's forward, so the report says which batch.
constexpr unsigned kKlBatchTag = 16;
constexpr unsigned kKindMask = 15;

struct DeviceErrors {
  unsigned long long first;
};

constexpr unsigned long long kNoError = ~0ull;

/// The key of an error: forward errors (stage 0) sort before the finish's (stage 1).
KTO_HOST_DEVICE inline unsigned long long error_key(index_t index, unsigned kind) {
  // A peer's failure (stage 2) ranks after any error of this rank's own.
  const unsigned k = kind & kKindMask;
  const bool finish = k >= kNonFiniteInput && k != kHostTargetsMismatch;
  const unsigned long long stage = k == kPeerFailure ? 2ull : finish ? 1ull : 0ull;
  return (stage << 62) | (static_cast<unsigned long long>(index) << 5) | kind;
}

/// The index (row, offset entry or sequence) of a key.
KTO_HOST_DEVICE inline long long error_index(unsigned long long key) {
  return static_cast<long long>((key >> 5) & ((1ull << 57) - 1));
}

#if defined(__CUDACC__)
__device__ __forceinline__ void record_error(DeviceErrors* errors, index_t index, unsigned kind) {
  atomicMin(&errors->first, error_key(index, kind));
}
#endif

}  // namespace device
}  // namespace kto

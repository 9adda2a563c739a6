// device_errors.cuh — how kernels report bad input without a host round trip.
//
// A kernel that finds a target id out of range, a non-finite logit or a bad
// offset writes key = (index << 4) | kind into one 64-bit word with atomicMin.
// The smallest key wins whatever the thread order, so the reported error is
// deterministic; the host reads the word after the stream is synchronised
// (kto::cuda::read_status). All ones means no error.
#pragma once

#include <kto/config.hpp>

namespace kto {
namespace device {

enum ErrorKind : unsigned {
  kTargetOutOfRange = 1,  ///< index = row
  kNonFiniteLogits = 2,   ///< index = row
  kInvalidOffsets = 3,    ///< index = offset entry
  kNonFiniteInput = 4,    ///< index = sequence (reference / KL log-prob, g_s)
  kInvalidLabel = 5,      ///< index = sequence
};
/// OR-ed into the kind by the KL batch's forward, so the report says which batch.
constexpr unsigned kKlBatchTag = 8;

struct DeviceErrors {
  unsigned long long first;
};

constexpr unsigned long long kNoError = ~0ull;

__device__ __forceinline__ void record_error(DeviceErrors* errors, index_t index, unsigned kind) {
  const unsigned long long key = (static_cast<unsigned long long>(index) << 4) | kind;
  atomicMin(&errors->first, key);
}

}  // namespace device
}  // namespace kto

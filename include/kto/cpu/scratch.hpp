// cpu/scratch.hpp — large buffers kept by the calling thread between calls.
//
// A fused step's chunk buffers are tens of MiB. Allocated afresh on every call,
// they come from new mappings: the kernel faults in and zeroes each 4 KiB page
// on first touch, and unmaps it on free — measured as about a quarter of a
// 384-row × 32000-vocab bfloat16 forward on the reference machine. So each
// thread keeps one buffer per role (Slot) and hands it out again when it is
// big enough — at most the chunk budget per role, since the fused step sizes
// its chunks by it; release_scratch() returns this thread's buffers.
// A role already in use on this thread (a nested call) gets a buffer of its own.
// Contents are uninitialised: users write before they read.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>

namespace kto {
namespace cpu {
namespace detail {

/// The kept roles; `none`: a buffer of the array's own, freed with it.
enum class Slot : int { logits = 0, hidden, hidden_bf16, count, none = count };

struct ScratchBlock {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> memory;
  size_t capacity = 0;
  bool in_use = false;
};

inline ScratchBlock* scratch_blocks() {
  thread_local ScratchBlock blocks[static_cast<int>(Slot::count)];
  return blocks;
}

constexpr size_t kScratchAlignment = 64;

inline void* aligned_bytes(size_t bytes) {
  if (bytes > static_cast<size_t>(-1) - (kScratchAlignment - 1))
    throw std::length_error("kto: scratch size");
  const size_t rounded = (bytes + kScratchAlignment - 1) / kScratchAlignment * kScratchAlignment;
  void* p = std::aligned_alloc(kScratchAlignment, rounded == 0 ? kScratchAlignment : rounded);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

/// n elements of T from this thread's buffer for `slot` (or a buffer of its own).
template <class T>
class ScratchArray {
 public:
  ScratchArray() = default;
  ScratchArray(Slot slot, size_t n) : size_(n) {
    if (n == 0) return;
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::length_error("kto: scratch size");
    const size_t bytes = n * sizeof(T);
    ScratchBlock* kept = slot == Slot::none ? nullptr : &scratch_blocks()[static_cast<int>(slot)];
    if (kept && !kept->in_use) {
      ScratchBlock& block = *kept;
      if (block.capacity < bytes) {
        block.memory.reset();  // free first: the old and new buffers are never both held
        block.capacity = 0;
        block.memory.reset(aligned_bytes(bytes));
        block.capacity = bytes;
      }
      block.in_use = true;
      block_ = &block;
      data_ = static_cast<T*>(block.memory.get());
    } else {
      own_.reset(aligned_bytes(bytes));
      data_ = static_cast<T*>(own_.get());
    }
  }
  ScratchArray(ScratchArray&& other) noexcept { *this = std::move(other); }
  ScratchArray& operator=(ScratchArray&& other) noexcept {
    if (this != &other) {
      release();
      data_ = other.data_;
      size_ = other.size_;
      block_ = other.block_;
      own_ = std::move(other.own_);
      other.data_ = nullptr;
      other.size_ = 0;
      other.block_ = nullptr;
    }
    return *this;
  }
  ScratchArray(const ScratchArray&) = delete;
  ScratchArray& operator=(const ScratchArray&) = delete;
  ~ScratchArray() { release(); }

  T* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

 private:
  void release() {
    if (block_) block_->in_use = false;
    block_ = nullptr;
  }
  T* data_ = nullptr;
  size_t size_ = 0;
  ScratchBlock* block_ = nullptr;
  std::unique_ptr<void, ScratchBlock::Free> own_;
};

}  // namespace detail

/// Frees the buffers this thread keeps between fused-step calls (none in use).
inline void release_scratch() {
  detail::ScratchBlock* blocks = detail::scratch_blocks();
  for (int i = 0; i < static_cast<int>(detail::Slot::count); ++i) {
    if (blocks[i].in_use) continue;
    blocks[i].memory.reset();
    blocks[i].capacity = 0;
  }
}

}  // namespace cpu
}  // namespace kto

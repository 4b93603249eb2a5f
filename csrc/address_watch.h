// Whether an allocation was made at one of a few addresses since they were noted: how a
// gradient note (storages.cpp) tells "the very storages as last step" without holding them.
//
// A weak reference to each gradient's StorageImpl did the same, but it kept the storage's
// object alive past the gradient's free: with zero_grad(set_to_none=True) that is every
// gradient at every step, and the heap then placed the next step's tensors elsewhere. On the
// benchmark MLP (benchmarks/overhead_health.py, 3-4 MB gradients) that alone slowed the untouched
// step's kernels by 4-6 % (scratch ablations: weak references against raw pointers). A
// storage at the same address whose block was not allocated again since is the same storage;
// the tracker sees every allocation of the hooked allocators (CPU, CUDA), so it marks a watch
// whose address comes back, and nothing is kept alive. Memory that no hooked allocator hands
// out (pinned host memory, torch.from_numpy, a pluggable CUDA allocator, CUDA-graph pools) is
// invisible to it: a new storage object over such memory, at the old object's address, reads
// as the same - and the snapshot it skips would name the same addresses (nothing else
// records that memory either).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace memprof {

class alignas(64) AddressWatch {
 public:
  // Open addressing, at most half full, in the first `mask_ + 1` slots: a power of two sized to
  // the addresses watched, from 16 (every allocation looks one slot up, and a step clears the
  // table: a few cache lines for a small model, a few KiB for a few hundred parameters, where
  // a floor of 1024 slots made every step clear 8 KiB and every lookup land anywhere in it;
  // a mixture of experts with tens of thousands still fits).
  static constexpr int kMaxSlotBits = 17;
  static constexpr size_t kMaxSlots = size_t{1} << kMaxSlotBits;
  static constexpr size_t kMinSlots = 16;
  static constexpr size_t kMaxAddresses = kMaxSlots / 2;

  // Replaces the watched addresses (0 is skipped) and clears the mark; false (nothing watched)
  // when there are more than kMaxAddresses. Writer: the note's owner only.
  bool watch(const std::vector<int64_t>& addresses);
  // Watches nothing (the slots of the current size are cleared).
  void clear();
  // An allocation at `ptr`: marks the watch if it is one of its addresses. Any thread.
  void allocated(uint64_t ptr) {
    if (used_.load(std::memory_order_relaxed) == 0) return;
    const size_t mask = mask_.load(std::memory_order_relaxed);
    // bounded: a lookup racing a re-watch may read slots filled under another mask
    size_t i = slot_of(ptr, mask);
    for (size_t n = 0; n <= mask; ++n, i = (i + 1) & mask) {
      uint64_t v = slots_[i].load(std::memory_order_relaxed);
      if (v == 0) return;
      if (v == ptr) {
        hit_.store(true, std::memory_order_relaxed);
        return;
      }
    }
  }
  // Whether an allocation was made at a watched address since watch().
  bool hit() const { return hit_.load(std::memory_order_relaxed); }

 private:
  static size_t slot_of(uint64_t ptr, size_t mask) {
    return static_cast<size_t>((ptr * 0x9E3779B97F4A7C15ull) >> (64 - kMaxSlotBits)) & mask;
  }
  // Atomics only: the watches are statics never destroyed (an allocation during interpreter
  // exit may still look one up), and zero-initialised (untouched slots cost no memory). What
  // every allocation reads first sits in the line of the first slots: a small table's lookup
  // is one cold line, not two (the big step's kernels evict both between allocations).
  std::atomic<size_t> used_{0};
  std::atomic<size_t> mask_{kMinSlots - 1};
  std::atomic<bool> hit_{false};
  std::atomic<uint64_t> slots_[kMaxSlots] = {};
};

static_assert(std::is_trivially_destructible_v<AddressWatch>, "see AddressWatch's members");

// A watch for the caller to hold (one per gradient note; null when all are taken), and its
// return. Watches live for the process: the allocation hook may read one as it is returned.
AddressWatch* acquire_address_watch();
void release_address_watch(AddressWatch* watch);

// The tracker's allocation hook: tells every watch in use.
void note_allocation(uint64_t ptr);

// The tracker's session while it records allocations, else 0 (tracker.cpp): a watch is
// told of allocations only then, so a note compares only within one recording session.
uint64_t recording_session();

// Whether a CPU block with this deleter was allocated while the event log was full (tracker.cpp,
// unlogged_delete): the log holds no allocation for it, so a snapshot does not name its address.
bool allocated_past_the_log(void (*deleter)(void*));
// The same for the CUDA block at `ptr` (alive: its storage is held), from the addresses the
// tracker notes once the log is full.
bool cuda_block_past_the_log(uint64_t ptr);

}  // namespace memprof

#include "cpu_blocks.h"

#include <atomic>
#include <mutex>
#include <cstddef>
#include <thread>

#include "live_blocks.h"

namespace memprof {
namespace {

// A lock held for a few dozen instructions (a probe of a half-empty table); a waiter yields,
// so one preempted holder does not stall the other core's thread for its whole slice.
class SpinLock {
 public:
  void lock() {
    while (held_.exchange(true, std::memory_order_acquire)) {
      while (held_.load(std::memory_order_relaxed)) std::this_thread::yield();
    }
  }
  void unlock() { held_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> held_{false};
};

// One table under one spin lock, its header - the lock, the table's bounds and count, the
// running total - in one cache line that every event touches, so that line stays warm from
// one event to the next and an event's one cold line is the slot it probes. (64 shards,
// each a header and its own table, read two cold lines an event on an op-bound step, whose
// kernels evict the caches between ops, and the total's line a third.) A note is a probe of
// a table at most half full: the lock stays short, and growth (doubling) is rare.
struct alignas(64) Blocks {
  SpinLock lock;
  // Bytes of the blocks noted: written under the lock, read without it (cpu_block_bytes).
  std::atomic<int64_t> bytes{0};
  LiveBlocks sizes{64};
};
static_assert(sizeof(Blocks) == 64, "the header is one cache line");

// Never destroyed (blocks made while tracking may be freed during interpreter exit), and
// static rather than on the heap: its address is a constant, no pointer to load first.
union Forever {
  Forever() : blocks() {}
  ~Forever() {}
  Blocks blocks;
};
Forever g_forever;
Blocks& g_blocks = g_forever.blocks;
// the mark of a reported block's note, in the size's top bit below the sign
constexpr int64_t kReported = int64_t{1} << 62;

// The total moved by `delta` (under the lock: a plain load and store, no locked add).
inline int64_t add_bytes(int64_t delta) {
  const int64_t total = g_blocks.bytes.load(std::memory_order_relaxed) + delta;
  g_blocks.bytes.store(total, std::memory_order_relaxed);
  return total;
}

}  // namespace

int64_t note_cpu_block(void* ptr, int64_t nbytes, bool reported) {
  // (a guard: a table that fails to grow throws, and the lock must not stay held - the
  // block's deleter takes it as the exception unwinds)
  std::lock_guard<SpinLock> hold(g_blocks.lock);
  // a size still noted at this address - a block freed without passing take_cpu_block -
  // is replaced, and leaves the total
  const int64_t old = g_blocks.sizes.put(reinterpret_cast<uint64_t>(ptr),
                                         reported ? nbytes | kReported : nbytes);
  return add_bytes(nbytes - (old > 0 ? old & ~kReported : 0));
}

int64_t take_cpu_block(void* ptr, int64_t* total) {
  std::lock_guard<SpinLock> hold(g_blocks.lock);
  int64_t nbytes = g_blocks.sizes.take(reinterpret_cast<uint64_t>(ptr));
  if (nbytes <= 0) {
    *total = g_blocks.bytes.load(std::memory_order_relaxed);
    return 0;
  }
  nbytes &= ~kReported;
  *total = add_bytes(-nbytes);
  return nbytes;
}

int64_t cpu_block_bytes() { return g_blocks.bytes.load(std::memory_order_relaxed); }

void forget_reported_cpu_blocks() {
  std::lock_guard<SpinLock> hold(g_blocks.lock);
  int64_t dropped = 0;
  g_blocks.sizes.erase_if([&dropped](int64_t value) {
    if ((value & kReported) == 0) return false;
    dropped += value & ~kReported;
    return true;
  });
  add_bytes(-dropped);
}

void lock_cpu_blocks_for_fork() { g_blocks.lock.lock(); }

void unlock_cpu_blocks_after_fork() { g_blocks.lock.unlock(); }

}  // namespace memprof

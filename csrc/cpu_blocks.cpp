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

constexpr int kShardBits = 6;
constexpr size_t kShards = size_t{1} << kShardBits;

struct alignas(64) Shard {
  SpinLock lock;
  LiveBlocks sizes{64};
};

// Never destroyed: blocks made while tracking may be freed during interpreter exit.
Shard* const g_shards = new Shard[kShards];
std::atomic<int64_t> g_bytes{0};
// the mark of a reported block's note, in the size's top bit below the sign
constexpr int64_t kReported = int64_t{1} << 62;

inline Shard& shard_of(void* ptr) {
  // the top bits of a multiplicative hash (the table inside uses middle ones)
  uint64_t h = reinterpret_cast<uint64_t>(ptr) * 0x9E3779B97F4A7C15ull;
  return g_shards[h >> (64 - kShardBits)];
}

}  // namespace

int64_t note_cpu_block(void* ptr, int64_t nbytes, bool reported) {
  Shard& s = shard_of(ptr);
  int64_t old;
  {
    // (a guard: a table that fails to grow throws, and the lock must not stay held - the
    // block's deleter takes it as the exception unwinds)
    std::lock_guard<SpinLock> hold(s.lock);
    // a size still noted at this address - a block freed without passing take_cpu_block -
    // is replaced, and leaves the total
    old = s.sizes.put(reinterpret_cast<uint64_t>(ptr), reported ? nbytes | kReported : nbytes);
  }
  const int64_t delta = nbytes - (old > 0 ? old & ~kReported : 0);
  return g_bytes.fetch_add(delta, std::memory_order_relaxed) + delta;
}

int64_t take_cpu_block(void* ptr, int64_t* total) {
  Shard& s = shard_of(ptr);
  int64_t nbytes;
  {
    std::lock_guard<SpinLock> hold(s.lock);
    nbytes = s.sizes.take(reinterpret_cast<uint64_t>(ptr));
  }
  if (nbytes > 0) nbytes &= ~kReported;
  if (nbytes <= 0) {
    *total = g_bytes.load(std::memory_order_relaxed);
    return 0;
  }
  *total = g_bytes.fetch_sub(nbytes, std::memory_order_relaxed) - nbytes;
  return nbytes;
}

int64_t cpu_block_bytes() { return g_bytes.load(std::memory_order_relaxed); }

void forget_reported_cpu_blocks() {
  for (size_t i = 0; i < kShards; ++i) {
    int64_t dropped = 0;
    {
      std::lock_guard<SpinLock> hold(g_shards[i].lock);
      g_shards[i].sizes.erase_if([&dropped](int64_t value) {
        if ((value & kReported) == 0) return false;
        dropped += value & ~kReported;
        return true;
      });
    }
    g_bytes.fetch_sub(dropped, std::memory_order_relaxed);
  }
}

void lock_cpu_blocks_for_fork() {
  for (size_t i = 0; i < kShards; ++i) g_shards[i].lock.lock();
}

void unlock_cpu_blocks_after_fork() {
  for (size_t i = kShards; i-- > 0;) g_shards[i].lock.unlock();
}

}  // namespace memprof

// address -> a value kept while the block at that address is alive: what pairs.cpp walks an
// event stream with (the index of each block's allocation) and what cpu_blocks.cpp keeps for
// the CPU blocks memprof hands out (their sizes). Not thread-safe: the caller locks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace memprof {

// Linear probing with backward-shift deletion (no tombstones), so a long run of reused
// addresses keeps probes short. Address 0 is never a key.
class LiveBlocks {
 public:
  // `slots`: the table's first size, a power of two
  explicit LiveBlocks(size_t slots = 1024) : slots_(slots, Slot{kEmpty, -1}), mask_(slots - 1) {}

  size_t size() const { return count_; }

  // Keeps `index` for addr; returns the value it replaced, or -1.
  int64_t put(uint64_t addr, int64_t index) {
    if ((count_ + 1) * 2 > slots_.size()) grow();
    size_t i = home(addr);
    while (slots_[i].addr != kEmpty && slots_[i].addr != addr) i = (i + 1) & mask_;
    int64_t replaced = slots_[i].addr == kEmpty ? -1 : slots_[i].index;
    if (slots_[i].addr == kEmpty) ++count_;
    slots_[i] = Slot{addr, index};
    return replaced;
  }

  // The value kept for addr (left in the table), or -1.
  int64_t find(uint64_t addr) const {
    for (size_t i = home(addr); slots_[i].addr != kEmpty; i = (i + 1) & mask_) {
      if (slots_[i].addr == addr) return slots_[i].index;
    }
    return -1;
  }

  // Removes every entry for whose value `drop(value)` is true (the table keeps its size).
  template <typename Drop>
  void erase_if(Drop drop) {
    std::vector<Slot> kept;
    for (const Slot& s : slots_) {
      if (s.addr != kEmpty && !drop(s.index)) kept.push_back(s);
    }
    slots_.assign(slots_.size(), Slot{kEmpty, -1});
    count_ = 0;
    for (const Slot& s : kept) put(s.addr, s.index);
  }

  // The value kept for addr (removed from the table), or -1.
  int64_t take(uint64_t addr) {
    size_t i = home(addr);
    while (slots_[i].addr != kEmpty) {
      if (slots_[i].addr == addr) {
        int64_t index = slots_[i].index;
        erase_at(i);
        return index;
      }
      i = (i + 1) & mask_;
    }
    return -1;
  }

 private:
  struct Slot {
    uint64_t addr;
    int64_t index;
  };
  // address 0 is never a live block's (a null data pointer has no allocation event)
  static constexpr uint64_t kEmpty = 0;

  size_t home(uint64_t addr) const {
    // allocator addresses share their low bits (alignment): mix before masking
    uint64_t h = addr * 0x9E3779B97F4A7C15ull;
    return static_cast<size_t>(h >> 20) & mask_;
  }

  void erase_at(size_t i) {
    --count_;
    size_t hole = i;
    for (size_t j = (i + 1) & mask_; slots_[j].addr != kEmpty; j = (j + 1) & mask_) {
      size_t h = home(slots_[j].addr);
      // move j back into the hole when its home is not in (hole, j] (cyclically)
      bool stays = hole <= j ? (hole < h && h <= j) : (hole < h || h <= j);
      if (!stays) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole] = Slot{kEmpty, -1};
  }

  void grow() {
    // the bigger table made first: if that throws, the table is left as it was
    std::vector<Slot> old(slots_.size() * 2, Slot{kEmpty, -1});
    old.swap(slots_);
    mask_ = slots_.size() - 1;
    count_ = 0;
    for (const Slot& s : old) {
      if (s.addr != kEmpty) put(s.addr, s.index);
    }
  }

  std::vector<Slot> slots_;
  size_t mask_;
  size_t count_ = 0;
};

}  // namespace memprof

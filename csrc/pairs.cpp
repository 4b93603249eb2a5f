// Pairs each allocation of an event stream with the free that releases it, in one pass.
//
// Leaving a tracked block (and loading a profile) needs, for every event, its partner: the
// categories, the live-byte timeline and every "alive at" query read it. A block's address is
// unique while it is alive, so walking the stream in order with "address -> its allocation
// not yet freed" gives each free its allocation: O(n) with an open-addressing table sized to
// the blocks alive at once, instead of a stable sort of every address (the numpy way, which
// tests/record/test_pairs.py keeps as the reference this must equal).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "bindings.h"

namespace py = pybind11;

namespace memprof {
namespace {

// address -> index of its allocation not yet freed. Linear probing with backward-shift
// deletion (no tombstones), so a long run of reused addresses keeps probes short.
class LiveBlocks {
 public:
  LiveBlocks() : slots_(1024, Slot{kEmpty, -1}), mask_(1023) {}

  void put(uint64_t addr, int64_t index) {
    if ((count_ + 1) * 2 > slots_.size()) grow();
    size_t i = home(addr);
    while (slots_[i].addr != kEmpty && slots_[i].addr != addr) i = (i + 1) & mask_;
    if (slots_[i].addr == kEmpty) ++count_;
    slots_[i] = Slot{addr, index};
  }

  // The allocation alive at addr (removed from the table), or -1.
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
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.size() * 2, Slot{kEmpty, -1});
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

template <typename Index>
py::tuple pair(const uint8_t* ptr_col, ssize_t ptr_stride, const uint8_t* size_col,
               ssize_t size_stride, ssize_t n) {
  py::array_t<Index> free_of(n), alloc_of(n);
  Index* f = free_of.mutable_data();
  Index* a = alloc_of.mutable_data();
  {
    py::gil_scoped_release release;
    for (ssize_t i = 0; i < n; ++i) f[i] = a[i] = -1;
    LiveBlocks live;
    for (ssize_t i = 0; i < n; ++i) {
      uint64_t addr = *reinterpret_cast<const uint64_t*>(ptr_col + i * ptr_stride);
      int64_t size = *reinterpret_cast<const int64_t*>(size_col + i * size_stride);
      if (addr == 0 || size == 0) continue;
      if (size > 0) {
        live.put(addr, i);   // an unreleased earlier allocation at addr is forgotten
      } else {
        int64_t at = live.take(addr);
        if (at >= 0) {
          f[at] = static_cast<Index>(i);
          a[i] = static_cast<Index>(at);
        }
      }
    }
  }
  return py::make_tuple(free_of, alloc_of);
}

// ptr, size: the uint64 / int64 columns of an event array (strided views are read in place).
py::tuple pair_allocations(py::array ptr, py::array size) {
  if (ptr.ndim() != 1 || size.ndim() != 1 || ptr.shape(0) != size.shape(0)) {
    throw py::value_error("pair_allocations: expected two 1-D columns of the same length");
  }
  if (ptr.itemsize() != 8 || size.itemsize() != 8 || ptr.strides(0) % 8 != 0 ||
      size.strides(0) % 8 != 0) {
    throw py::value_error("pair_allocations: expected 8-byte ptr and size columns");
  }
  ssize_t n = ptr.shape(0);
  auto* p = static_cast<const uint8_t*>(ptr.data());
  auto* s = static_cast<const uint8_t*>(size.data());
  if (n < (ssize_t(1) << 31)) return pair<int32_t>(p, ptr.strides(0), s, size.strides(0), n);
  return pair<int64_t>(p, ptr.strides(0), s, size.strides(0), n);
}

}  // namespace

void register_pairs(py::module_& m) {
  m.def("pair_allocations", &pair_allocations, py::arg("ptr"), py::arg("size"),
        "(free_of, alloc_of) of an event stream: for each allocation the index of its free "
        "(-1: alive at the end), for each free the index of its allocation (-1: a block from "
        "before the stream); int32 below 2**31 events.");
}

}  // namespace memprof

#include "address_watch.h"

#include <mutex>

namespace memprof {
namespace {

// One per live optimizer (a note lets its watch go when its optimizer is collected or the
// session ends); a note without one falls back to "not the same" at every step (a snapshot
// each step, as with gradients made anew). Every allocation looks each watch in use up, so
// this stays small.
constexpr int kWatches = 8;
AddressWatch g_watches[kWatches];
std::atomic<uint32_t> g_in_use{0};   // bit i: g_watches[i] is held
std::mutex g_acquire_mu;

}  // namespace

bool AddressWatch::watch(const std::vector<int64_t>& addresses) {
  clear();
  if (addresses.size() > kMaxAddresses) return false;
  size_t slots = kMinSlots;
  while (slots < 2 * addresses.size()) slots *= 2;
  const size_t mask = slots - 1;
  mask_.store(mask, std::memory_order_relaxed);
  size_t used = 0;
  for (int64_t a : addresses) {
    if (a <= 0) continue;
    auto ptr = static_cast<uint64_t>(a);
    size_t i = slot_of(ptr, mask);
    for (;; i = (i + 1) & mask) {
      uint64_t v = slots_[i].load(std::memory_order_relaxed);
      if (v == ptr) break;   // listed twice (tied gradients)
      if (v == 0) {
        slots_[i].store(ptr, std::memory_order_relaxed);
        ++used;
        break;
      }
    }
  }
  hit_.store(false, std::memory_order_relaxed);
  used_.store(used, std::memory_order_release);
  return true;
}

void AddressWatch::clear() {
  used_.store(0, std::memory_order_release);
  const size_t mask = mask_.load(std::memory_order_relaxed);   // (watch() sizes it after)
  for (size_t i = 0; i <= mask; ++i) slots_[i].store(0, std::memory_order_relaxed);
  hit_.store(false, std::memory_order_relaxed);
}

AddressWatch* acquire_address_watch() {
  std::lock_guard<std::mutex> lock(g_acquire_mu);
  uint32_t in_use = g_in_use.load(std::memory_order_relaxed);
  for (int i = 0; i < kWatches; ++i) {
    if ((in_use & (1u << i)) == 0) {
      g_watches[i].clear();
      g_in_use.store(in_use | (1u << i), std::memory_order_release);
      return &g_watches[i];
    }
  }
  return nullptr;
}

void release_address_watch(AddressWatch* watch) {
  if (watch == nullptr) return;
  std::lock_guard<std::mutex> lock(g_acquire_mu);
  watch->clear();
  auto i = static_cast<uint32_t>(watch - g_watches);
  g_in_use.store(g_in_use.load(std::memory_order_relaxed) & ~(1u << i),
                 std::memory_order_release);
}

void note_allocation(uint64_t ptr) {
  uint32_t in_use = g_in_use.load(std::memory_order_acquire);
  while (in_use != 0) {
    int i = __builtin_ctz(in_use);
    g_watches[i].allocated(ptr);
    in_use &= in_use - 1;
  }
}

}  // namespace memprof

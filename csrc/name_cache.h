// A thread's op and node names, by the address of their text: the name of every op a tracked
// step runs is looked up here (a few hundred times a step), right after the step's kernels
// have evicted the caches, so a lookup is built to touch one cold line. Not thread-safe: each
// thread has its own.
//
// A dispatcher op's name is its registered schema's and lives as long as the session (slots
// are emptied at each start): a hit on it is a multiply and a load of one 16-byte slot, and
// its text is not read. Any other name cached by address (a marker's label, a literal of a
// RecordFunction) is verified by content on a hit. The autograd engine's frame of each backward
// node, "autograd::engine::evaluate_function: <node>", is a string built for that frame, whose
// address the next node's frame usually gets again: such names are looked up by content only
// and never take a slot (cached by address, they missed on nearly every node, and each miss
// evicted an op's slot, which then missed too: ~17 refills a step on the benchmark MLP, each
// a heap copy of the text and a hash-map lookup).
//
// Two ways per set: two names whose addresses share a set (the benchmark MLP had
// aten::ones_like and aten::nll_loss_forward) no longer evict each other every step.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace memprof {

constexpr char kEvaluateFunction[] = "autograd::engine::evaluate_function: ";
constexpr size_t kEvaluatePrefixLen = sizeof(kEvaluateFunction) - 1;

struct NameRef {
  int32_t id;       // the interned name; an evaluate_function frame's: its node's
  bool evaluate;    // "autograd::engine::evaluate_function: <node>"
};

inline uint64_t text_hash(const char* s, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, s + i, 8);
    h = (h ^ w) * 0xff51afd7ed558ccdull;
    h ^= h >> 32;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, s + i, n - i);
  h = (h ^ tail) * 0xc4ceb9fe1a85ec53ull;
  return h ^ (h >> 29);
}

// text -> string id, by content (open addressing on the text's hash, verified by content).
class NameIds {
 public:
  // `intern(text)`: the session-wide id of a text this thread has not seen yet
  template <typename Intern>
  int32_t find_or_add(const char* text, Intern&& intern) {
    const size_t n = std::strlen(text);
    const uint64_t h = text_hash(text, n);
    size_t i = h & (entries_.size() - 1);
    for (; entries_[i].id >= 0; i = (i + 1) & (entries_.size() - 1)) {
      const Entry& e = entries_[i];
      if (e.hash == h && e.text.size() == n && std::memcmp(e.text.data(), text, n) == 0) {
        return e.id;
      }
    }
    const int32_t id = intern(text);
    if ((count_ + 1) * 2 > entries_.size()) {
      grow();
      i = h & (entries_.size() - 1);
      while (entries_[i].id >= 0) i = (i + 1) & (entries_.size() - 1);
    }
    entries_[i] = Entry{h, id, std::string(text, n)};
    ++count_;
    return id;
  }

  void clear() {
    entries_.assign(kFirstSize, Entry{});
    count_ = 0;
  }

 private:
  struct Entry {
    uint64_t hash = 0;
    int32_t id = -1;   // -1: empty
    std::string text;
  };
  static constexpr size_t kFirstSize = 64;

  void grow() {
    std::vector<Entry> old(entries_.size() * 2);
    old.swap(entries_);
    for (Entry& e : old) {
      if (e.id < 0) continue;
      size_t i = e.hash & (entries_.size() - 1);
      while (entries_[i].id >= 0) i = (i + 1) & (entries_.size() - 1);
      entries_[i] = std::move(e);
    }
  }

  std::vector<Entry> entries_ = std::vector<Entry>(kFirstSize);
  size_t count_ = 0;
};

class NameCache {
 public:
  // `intern(text)`: the session-wide id of a new text; `stable()`: whether `name`'s address
  // holds this text for the whole session (asked only when a slot is filled)
  template <typename Intern, typename Stable>
  NameRef lookup(const char* name, Intern&& intern, Stable&& stable) {
    const uint64_t h = (reinterpret_cast<uintptr_t>(name) * 0x9E3779B97F4A7C15ull) >> (64 - kBits);
    const size_t set = h & ~uint64_t{1};
    for (size_t way = set; way < set + 2; ++way) {
      const Slot& s = slots_[way];
      if (s.ptr == name && (s.stable || std::strcmp(texts_[way].c_str(), name) == 0)) {
        return NameRef{s.id, false};
      }
    }
    if (std::strncmp(name, kEvaluateFunction, kEvaluatePrefixLen) == 0) {
      return NameRef{ids_.find_or_add(name + kEvaluatePrefixLen, intern), true};
    }
    const int32_t id = ids_.find_or_add(name, intern);
    // the way to fill: an empty one, else the one verified by content where only one is,
    // else the name's own (two names verified by content then keep a way each)
    size_t way = set + (h & 1);
    if (slots_[set].ptr == nullptr || slots_[set + 1].ptr == nullptr) {
      way = slots_[set].ptr == nullptr ? set : set + 1;
    } else if (slots_[set].stable != slots_[set + 1].stable) {
      way = slots_[set].stable ? set + 1 : set;
    }
    Slot& s = slots_[way];
    s.ptr = nullptr;   // until filled (stable() may throw)
    s.stable = stable();
    if (!s.stable) texts_[way].assign(name);
    s.id = id;
    s.ptr = name;
    return NameRef{id, false};
  }

  void clear() {
    for (Slot& s : slots_) s.ptr = nullptr;
    ids_.clear();
  }

  // `count`: ops deregistered in the process so far. A stable slot names a registered schema's
  // text by its address, unchecked; once an op is deregistered that memory may hold the next
  // op's name (a custom op's Library destroyed and another defined: each new op read as the
  // first one), so when the count moved every stable slot is dropped (ids stay: by content).
  // (the check inline, the drop out of line: inlined whole into every op's start, the loop
  // cost ~40 instructions an op in the code around it)
  void note_deregistrations(uint64_t count) {
    if (__builtin_expect(count != deregistrations_, 0)) drop_stable(count);
  }

 private:
  __attribute__((noinline, cold)) void drop_stable(uint64_t count) {
    deregistrations_ = count;
    for (Slot& s : slots_) {
      if (s.stable) s.ptr = nullptr;
    }
  }

  struct Slot {
    const char* ptr = nullptr;
    int32_t id = -1;
    bool stable = false;   // no content check on a hit
  };
  static constexpr int kBits = 10;   // 512 sets of two: a step's ~100 names, few refills
  std::array<Slot, size_t{1} << kBits> slots_;
  std::array<std::string, size_t{1} << kBits> texts_;   // of the slots verified by content
  NameIds ids_;
  uint64_t deregistrations_ = 0;
};

}  // namespace memprof

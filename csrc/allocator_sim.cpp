// Native replay of an allocation event stream through a model of PyTorch's CUDA caching
// allocator. The rules follow c10/cuda/CUDACachingAllocator.cpp (DeviceCachingAllocator):
//
//  * requests are rounded up to a multiple of 512 B (round_size; the optional
//    roundup_power2_divisions setting is not modelled);
//  * rounded size <= 1 MiB goes to the small pool, larger to the large pool (get_pool);
//  * a cache miss allocates a segment of get_allocation_size(size): 2 MiB for the small pool,
//    20 MiB for sizes < 10 MiB, otherwise size rounded up to 2 MiB;
//  * best fit: the free block with the smallest (size, address) >= (size, 0) in the pool
//    (get_free_block); with max_split_size set, an oversize block (>= max_split_size) is not
//    handed to a request below max_split_size, and a request >= max_split_size only takes a
//    block smaller than request + 20 MiB;
//  * split (should_split): small pool (and every pool with expandable segments) when the rest
//    is >= 512 B; large pool when request < max_split_size and the rest is > 1 MiB;
//  * free: merge with free neighbours of the same segment (free_block / try_merge_blocks);
//  * when a new segment does not fit into `capacity`: with max_split_size set, release oversize
//    cached blocks (release_available_cached_blocks), retry; then release every unsplit cached
//    segment of both pools (release_cached_blocks, as empty_cache does) and retry; then OOM;
//  * expandable_segments: one virtual segment per pool whose pages are mapped on demand at the
//    lowest address that can hold the request (find_expandable_block / map_block), pages of
//    2 MiB (small pool) and 20 MiB (large pool) as in the source; a cache flush unmaps the
//    fully free pages of free blocks (unmap_block) and drops a segment with nothing mapped.
//
// Not modelled: streams and cross-stream event deferral, CUDA graph private pools,
// garbage_collection_threshold, roundup_power2_divisions, per-process memory fraction (the
// capacity is the only limit), the device memory taken outside the allocator, and the address
// order of cudaMalloc results (new segments get increasing addresses; ties between equal-sized
// blocks of different segments are broken by that order). Sizes in the input are taken as
// the bytes requested; a stream recorded on a GPU reports block sizes (already rounded).
//
// Cost per event: one probe of an open-addressing ptr -> block map, and for the pool's free
// blocks a size-class bitmap over small sorted chunks (FreeIndex), so best fit, insert and
// erase touch a few cache lines; blocks and chunks are recycled, nothing is allocated per
// event once the working set has been reached. Cache flushes scan the free blocks (O(free)).
#include "allocator_sim.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <string>

#ifndef MEMPROF_SIM_NO_PYTHON  // define it to build the replay core alone (native benchmarks)
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "events.h"
#endif

namespace memprof {
namespace {

constexpr uint64_t kMinBlockSize = 512;
constexpr uint64_t kSmallSize = 1ull << 20;       // largest "small" request: 1 MiB
constexpr uint64_t kSmallBuffer = 2ull << 20;     // small-pool segment: 2 MiB
constexpr uint64_t kMinLargeAlloc = 10ull << 20;  // requests below 10 MiB share 20 MiB segments
constexpr uint64_t kLargeBuffer = 20ull << 20;
constexpr uint64_t kRoundLarge = 2ull << 20;      // larger requests: rounded up to 2 MiB
constexpr uint64_t kExpandableSpan = 1ull << 44;  // virtual range of one expandable segment
constexpr uint64_t kUnlimited = std::numeric_limits<uint64_t>::max();
constexpr int32_t kNone = -1;

using u128 = unsigned __int128;
inline u128 size_addr_key(uint64_t size, uint64_t addr) { return (u128(size) << 64) | addr; }
inline uint64_t key_size(u128 k) { return uint64_t(k >> 64); }
inline uint64_t round_up(uint64_t x, uint64_t m) { return (x + m - 1) / m * m; }

// First index i in a[0, n) with a[i] >= k. Branch-free halving (compiles to cmov): the
// searches are short and unpredictable, so this beats std::lower_bound by ~2x here.
inline int32_t lower_bound_u128(const u128* a, int32_t n, u128 k) {
  if (n == 0) return 0;
  int32_t base = 0;
  while (n > 1) {
    const int32_t half = n / 2;
    base = (a[base + half] < k) ? base + half : base;
    n -= half;
  }
  return base + int32_t(a[base] < k);
}

// Ordered set of (size, address) keys with an int32 payload (the block id), ordered as the
// allocator's BlockComparatorSize. Two levels: a sorted list of chunks, each a sorted array of
// at most kChunk keys, plus the max key of every chunk for routing. Lookups are two binary
// searches over contiguous memory; inserts and erases move at most one chunk; a chunk split,
// merge or removal moves the (n / kChunk)-long routing arrays. No allocation per operation:
// chunks are recycled.
template <int32_t kChunk>
class SortedChunks {
 public:
  struct Pos {
    int32_t c;  // index into order_
    int32_t i;  // index inside the chunk
  };

  bool empty() const { return count_ == 0; }
  bool at_end(Pos p) const { return p.c >= int32_t(order_.size()); }
  u128 key(Pos p) const { return chunks_[order_[p.c]].key[p.i]; }
  int32_t val(Pos p) const { return chunks_[order_[p.c]].val[p.i]; }
  Pos next(Pos p) const {
    if (p.i + 1 < chunks_[order_[p.c]].n) return {p.c, p.i + 1};
    return {p.c + 1, 0};
  }

  Pos lower_bound(u128 k) const {
    const int32_t c = lower_bound_u128(maxk_.data(), int32_t(maxk_.size()), k);
    if (c == int32_t(order_.size())) return {c, 0};
    const Chunk& ch = chunks_[order_[c]];
    return {c, lower_bound_u128(ch.key, ch.n, k)};
  }

  void insert(u128 k, int32_t v) {
    if (order_.empty()) {
      order_.push_back(new_chunk());
      maxk_.push_back(k);
    }
    int32_t c = lower_bound_u128(maxk_.data(), int32_t(maxk_.size()), k);
    if (c == int32_t(order_.size())) c--;  // above every key: append to the last chunk
    if (chunks_[order_[c]].n == kChunk) {
      split(c);
      if (k > maxk_[c]) c++;
    }
    Chunk& ch = chunks_[order_[c]];
    const int32_t i = lower_bound_u128(ch.key, ch.n, k);
    std::memmove(ch.key + i + 1, ch.key + i, size_t(ch.n - i) * sizeof(u128));
    std::memmove(ch.val + i + 1, ch.val + i, size_t(ch.n - i) * sizeof(int32_t));
    ch.key[i] = k;
    ch.val[i] = v;
    ch.n++;
    if (k > maxk_[c]) maxk_[c] = k;
    count_++;
  }

  void erase(Pos p) {
    const int32_t id = order_[p.c];
    Chunk& ch = chunks_[id];
    std::memmove(ch.key + p.i, ch.key + p.i + 1, size_t(ch.n - p.i - 1) * sizeof(u128));
    std::memmove(ch.val + p.i, ch.val + p.i + 1, size_t(ch.n - p.i - 1) * sizeof(int32_t));
    ch.n--;
    count_--;
    if (ch.n == 0) {
      free_chunks_.push_back(id);
      order_.erase(order_.begin() + p.c);
      maxk_.erase(maxk_.begin() + p.c);
      return;
    }
    if (p.i == ch.n) maxk_[p.c] = ch.key[ch.n - 1];
    if (ch.n < kChunk / 4) {  // keep chunks at least ~1/4 full on average
      if (p.c + 1 < int32_t(order_.size()) && ch.n + chunks_[order_[p.c + 1]].n <= kChunk / 2) {
        merge_next(p.c);
      } else if (p.c > 0 && ch.n + chunks_[order_[p.c - 1]].n <= kChunk / 2) {
        merge_next(p.c - 1);
      }
    }
  }

 private:
  struct Chunk {
    int32_t n = 0;
    u128 key[kChunk];
    int32_t val[kChunk];
  };

  int32_t new_chunk() {
    if (!free_chunks_.empty()) {
      const int32_t id = free_chunks_.back();
      free_chunks_.pop_back();
      chunks_[id].n = 0;
      return id;
    }
    chunks_.emplace_back();
    return int32_t(chunks_.size() - 1);
  }

  void split(int32_t c) {
    const int32_t id = new_chunk();  // may move chunks_: take references afterwards
    Chunk& a = chunks_[order_[c]];
    Chunk& b = chunks_[id];
    const int32_t h = a.n / 2;
    b.n = a.n - h;
    std::memcpy(b.key, a.key + h, size_t(b.n) * sizeof(u128));
    std::memcpy(b.val, a.val + h, size_t(b.n) * sizeof(int32_t));
    a.n = h;
    const u128 old_max = maxk_[c];
    order_.insert(order_.begin() + c + 1, id);
    maxk_.insert(maxk_.begin() + c + 1, old_max);
    maxk_[c] = a.key[h - 1];
  }

  void merge_next(int32_t c) {  // append chunk c+1 to chunk c
    Chunk& a = chunks_[order_[c]];
    Chunk& b = chunks_[order_[c + 1]];
    std::memcpy(a.key + a.n, b.key, size_t(b.n) * sizeof(u128));
    std::memcpy(a.val + a.n, b.val, size_t(b.n) * sizeof(int32_t));
    a.n += b.n;
    maxk_[c] = maxk_[c + 1];
    free_chunks_.push_back(order_[c + 1]);
    order_.erase(order_.begin() + c + 1);
    maxk_.erase(maxk_.begin() + c + 1);
  }

  std::vector<Chunk> chunks_;
  std::vector<int32_t> free_chunks_;
  std::vector<int32_t> order_;
  std::vector<u128> maxk_;
  size_t count_ = 0;
};

// The free-block index of one pool: (size, address) keys split by size class (16 classes per
// power of two, monotone in size) with a bitmap of the non-empty classes; each class holds
// its keys in a SortedChunks. Usually a class holds a handful of blocks, so an operation is
// a class computation, a short search and a bit scan; a class with very many equal-sized
// blocks still costs O(log n + chunk) per operation plus O(n / chunk) on a chunk split/merge.
class FreeIndex {
  using Inner = SortedChunks<32>;

 public:
  static constexpr int32_t kClasses = 1024;
  struct Pos {
    int32_t c;  // size class, kClasses at the end
    Inner::Pos p;
  };

  bool empty() const { return count_ == 0; }
  Pos begin() const { return first_from(0); }
  bool at_end(Pos p) const { return p.c >= kClasses; }
  u128 key(Pos p) const { return cls_[p.c].key(p.p); }
  int32_t val(Pos p) const { return cls_[p.c].val(p.p); }
  Pos next(Pos p) const {
    const Inner::Pos q = cls_[p.c].next(p.p);
    if (!cls_[p.c].at_end(q)) return {p.c, q};
    return first_from(p.c + 1);
  }
  Pos lower_bound(u128 k) const {
    const int32_t c = size_class(key_size(k));
    if (bit(c)) {
      const Inner::Pos q = cls_[c].lower_bound(k);
      if (!cls_[c].at_end(q)) return {c, q};
    }
    return first_from(c + 1);
  }
  void insert(u128 k, int32_t v) {
    const int32_t c = size_class(key_size(k));
    cls_[c].insert(k, v);
    words_[c >> 6] |= 1ull << (c & 63);
    summary_ |= 1ull << (c >> 6);
    count_++;
  }
  void erase(Pos p) {
    cls_[p.c].erase(p.p);
    count_--;
    if (cls_[p.c].empty()) {
      words_[p.c >> 6] &= ~(1ull << (p.c & 63));
      if (words_[p.c >> 6] == 0) summary_ &= ~(1ull << (p.c >> 6));
    }
  }
  void erase_key(u128 k) {
    const int32_t c = size_class(key_size(k));
    const Inner::Pos q = cls_[c].lower_bound(k);
    if (!cls_[c].at_end(q) && cls_[c].key(q) == k) erase({c, q});
  }

  static int32_t size_class(uint64_t size) {
    if (size < 16) return int32_t(size);
    const int m = 63 - __builtin_clzll(size);  // 4..63
    return int32_t((m - 3) * 16 + ((size >> (m - 4)) & 15));
  }

 private:
  bool bit(int32_t c) const { return (words_[c >> 6] >> (c & 63)) & 1; }
  Pos first_from(int32_t c) const {  // first key of the first non-empty class >= c
    if (c < kClasses) {
      int32_t w = c >> 6;
      uint64_t bits = words_[w] & (~0ull << (c & 63));
      if (!bits) {
        const uint64_t s = (w + 1 < 64) ? (summary_ & (~0ull << (w + 1))) : 0;
        if (s) {
          w = __builtin_ctzll(s);
          bits = words_[w];
        }
      }
      if (bits) return {(w << 6) + __builtin_ctzll(bits), Inner::Pos{0, 0}};
    }
    return {kClasses, Inner::Pos{0, 0}};
  }

  std::vector<Inner> cls_ = std::vector<Inner>(kClasses);
  uint64_t words_[kClasses / 64] = {};
  uint64_t summary_ = 0;
  size_t count_ = 0;
};

// Open-addressing hash map ptr -> block id: linear probing, backward-shift deletion (no
// tombstones), load factor <= 1/2.
class PtrMap {
 public:
  PtrMap() { rehash(1 << 12); }

  void insert(uint64_t k, int32_t v) {  // k must not be present
    uint64_t i = slot(k);
    slots_[i] = {k, v};
    count_++;
  }

  // The slot of k, or of the empty slot where k would go (room for one insert is made first,
  // so the slot stays valid until the next insert): one probe serves find-then-insert.
  uint64_t slot(uint64_t k) {
    if ((count_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    uint64_t i = hash(k) & mask_;
    while (slots_[i].val >= 0 && slots_[i].key != k) i = (i + 1) & mask_;
    return i;
  }
  int32_t at(uint64_t i) const { return slots_[i].val; }
  void prefetch(uint64_t k) const { __builtin_prefetch(&slots_[hash(k) & mask_]); }
  void set(uint64_t i, uint64_t k, int32_t v) {  // fill a slot returned by slot(k)
    if (slots_[i].val < 0) count_++;
    slots_[i] = {k, v};
  }

  int32_t take(uint64_t k) {  // remove k, return its value (or kNone)
    uint64_t i = hash(k) & mask_;
    for (;; i = (i + 1) & mask_) {
      if (slots_[i].val < 0) return kNone;
      if (slots_[i].key == k) break;
    }
    return remove_at(i);
  }

  int32_t remove_at(uint64_t i) {  // backward-shift deletion of an occupied slot
    const int32_t v = slots_[i].val;
    for (uint64_t j = (i + 1) & mask_; slots_[j].val >= 0; j = (j + 1) & mask_) {
      const uint64_t h = hash(slots_[j].key) & mask_;
      // move slot j into the hole at i unless its home h lies cyclically in (i, j]
      const bool stays = (i <= j) ? (h > i && h <= j) : (h > i || h <= j);
      if (!stays) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i].val = kNone;
    count_--;
    return v;
  }

 private:
  struct Slot {
    uint64_t key;
    int32_t val;
  };
  static uint64_t hash(uint64_t k) {  // murmur3 fmix64
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
  }
  void rehash(size_t n) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(n, Slot{0, kNone});
    mask_ = n - 1;
    count_ = 0;
    for (const Slot& s : old)
      if (s.val >= 0) insert(s.key, s.val);
  }
  std::vector<Slot> slots_;
  uint64_t mask_ = 0;
  size_t count_ = 0;
};

struct Block {
  uint64_t addr = 0;
  uint64_t size = 0;
  uint64_t requested = 0;  // unrounded request while allocated
  int32_t prev = kNone;    // neighbours inside the segment
  int32_t next = kNone;
  bool allocated = false;
  bool mapped = true;  // false: unmapped range of an expandable segment
  bool small = false;
  bool live = false;   // slot in use
};

struct Pool {
  Pool(bool s, uint64_t p) : small(s), page(p) {}
  bool small;
  uint64_t page;                          // expandable-segment page size
  FreeIndex free;                         // free mapped blocks by (size, addr)
  std::map<uint64_t, int32_t> unmapped;   // expandable: unmapped ranges by address
};

class Simulator {
 public:
  Simulator(const AllocSimOptions& o, AllocSimLayout* layout) : o_(o), layout_(layout) {
    if (o_.max_split_size == 0) o_.max_split_size = kUnlimited;
    blocks_.reserve(1024);
  }

  AllocSimSummary run(const uint64_t* ptr, int64_t ps, const int64_t* size, int64_t ss, int64_t n,
                      int64_t* res_out, int64_t* alloc_out) {
    s_.num_events = n;
    const bool timeline = o_.record_timeline;
    if (layout_) {
      layout_->block_addr.assign(size_t(n), 0);
      layout_->block_size.assign(size_t(n), 0);
      layout_->segments.clear();
    }
    int64_t i = 0;
    constexpr int64_t kAhead = 8;  // hash slots of upcoming events are fetched early
    for (; i < n; ++i) {
      if (i + kAhead < n) live_.prefetch(ptr[(i + kAhead) * ps]);
      const uint64_t p = ptr[i * ps];
      const int64_t sz = size[i * ss];
      bool ok = true;
      event_ = i;
      if (sz > 0) {
        ok = malloc(p, uint64_t(sz), i);
      } else if (sz < 0) {
        free(p);
      } else {
        s_.zero_size_events++;
      }
      if (reserved_ > s_.peak_reserved) {
        s_.peak_reserved = reserved_;
        s_.peak_reserved_event = i;
        s_.allocated_at_peak_reserved = allocated_;
        s_.segments_at_peak = segments_;
      }
      if (allocated_ > s_.peak_allocated) s_.peak_allocated = allocated_;
      if (requested_ > s_.peak_requested) s_.peak_requested = requested_;
      if (timeline) {
        if (res_out) res_out[i] = reserved_;
        if (alloc_out) alloc_out[i] = allocated_;
      }
      if (!ok) {
        ++i;
        break;
      }
    }
    s_.events_replayed = i;
    s_.allocated_end = allocated_;
    s_.reserved_end = reserved_;
    s_.segments_end = segments_;
    s_.fragmentation_at_peak =
        s_.peak_reserved > 0
            ? 1.0 - double(s_.allocated_at_peak_reserved) / double(s_.peak_reserved)
            : 0.0;
    return s_;
  }

 private:
  // ---- block slots -------------------------------------------------------------------------
  int32_t new_block(uint64_t addr, uint64_t size, int32_t prev, int32_t next, bool small,
                    bool mapped) {
    int32_t id;
    if (!free_slots_.empty()) {
      id = free_slots_.back();
      free_slots_.pop_back();
    } else {
      blocks_.emplace_back();
      id = int32_t(blocks_.size() - 1);
    }
    Block& b = blocks_[id];
    b.addr = addr;
    b.size = size;
    b.requested = 0;
    b.prev = prev;
    b.next = next;
    b.allocated = false;
    b.mapped = mapped;
    b.small = small;
    b.live = true;
    return id;
  }
  void drop_block(int32_t id) {
    blocks_[id].live = false;
    free_slots_.push_back(id);
  }
  Pool& pool_of(const Block& b) { return b.small ? small_ : large_; }
  u128 key_of(int32_t id) const { return size_addr_key(blocks_[id].size, blocks_[id].addr); }
  void note_segments() { s_.max_segments = std::max(s_.max_segments, segments_); }
  void note_segment(AllocSimLayout::Action action, uint64_t addr, uint64_t size, bool small) {
    if (layout_) layout_->segments.push_back({event_, addr, size, int8_t(action), small});
  }

  static uint64_t round_size(uint64_t size) {
    if (size < kMinBlockSize) return kMinBlockSize;
    return round_up(size, kMinBlockSize);
  }
  static uint64_t allocation_size(uint64_t size) {
    if (size <= kSmallSize) return kSmallBuffer;
    if (size < kMinLargeAlloc) return kLargeBuffer;
    return round_up(size, kRoundLarge);
  }
  bool fits(uint64_t bytes) const {
    return o_.capacity == 0 || uint64_t(reserved_) + bytes <= o_.capacity;
  }

  // ---- malloc / free -----------------------------------------------------------------------
  bool malloc(uint64_t p, uint64_t req, int64_t event) {
    s_.num_allocs++;
    const uint64_t slot = live_.slot(p);  // no other map operation until live_.set below
    const int32_t old = live_.at(slot);
    if (old != kNone) {  // the free of the previous holder of p was not recorded
      s_.duplicate_allocs++;
      free_block(old);
    }
    const uint64_t size = round_size(req);
    Pool& pool = size <= kSmallSize ? small_ : large_;
    int32_t b = get_free_block(pool, size);
    if (b == kNone) {
      const uint64_t alloc_size = allocation_size(size);
      b = alloc_block(pool, size, alloc_size);
      if (b == kNone && !o_.expandable_segments && o_.max_split_size != kUnlimited &&
          release_available_cached_blocks(pool, size)) {
        b = alloc_block(pool, size, alloc_size);
      }
      if (b == kNone) {
        release_cached_blocks();
        s_.num_alloc_retries++;
        b = alloc_block(pool, size, alloc_size);
      }
      if (b == kNone) {
        if (old != kNone) live_.remove_at(slot);
        s_.oom = true;
        s_.oom_event = event;
        s_.oom_bytes = int64_t(req);
        return false;
      }
    }
    const uint64_t remaining = blocks_[b].size - size;
    const bool split = (pool.small || o_.expandable_segments)
                           ? remaining >= kMinBlockSize
                           : (size < o_.max_split_size && remaining > kSmallSize);
    if (split) {
      const int32_t r = new_block(blocks_[b].addr + size, remaining, b, blocks_[b].next,
                                  pool.small, true);
      Block& B = blocks_[b];
      if (B.next != kNone) blocks_[B.next].prev = r;
      B.next = r;
      B.size = size;
      pool.free.insert(key_of(r), r);
    }
    Block& B = blocks_[b];
    B.allocated = true;
    B.requested = req;
    allocated_ += int64_t(B.size);
    requested_ += int64_t(req);
    live_.set(slot, p, b);
    if (layout_) {
      layout_->block_addr[size_t(event)] = B.addr;
      layout_->block_size[size_t(event)] = int64_t(B.size);
    }
    return true;
  }

  void free(uint64_t p) {
    const int32_t b = live_.take(p);
    if (b == kNone) {
      s_.unknown_frees++;
      return;
    }
    s_.num_frees++;
    free_block(b);
  }

  void free_block(int32_t b) {
    Block& B = blocks_[b];
    B.allocated = false;
    allocated_ -= int64_t(B.size);
    requested_ -= int64_t(B.requested);
    B.requested = 0;
    Pool& pool = pool_of(B);
    try_merge(b, blocks_[b].prev, pool);
    try_merge(b, blocks_[b].next, pool);
    pool.free.insert(key_of(b), b);
  }

  // Merge free neighbour src (same mapping state) into dst; dst must not be in an index.
  bool try_merge(int32_t dst, int32_t src, Pool& pool) {
    if (src == kNone) return false;
    Block& S = blocks_[src];
    Block& D = blocks_[dst];
    if (S.allocated || S.mapped != D.mapped) return false;
    if (S.mapped) {
      pool.free.erase_key(size_addr_key(S.size, S.addr));
    } else {
      pool.unmapped.erase(S.addr);
    }
    if (D.prev == src) {
      D.addr = S.addr;
      D.prev = S.prev;
      if (D.prev != kNone) blocks_[D.prev].next = dst;
    } else {
      D.next = S.next;
      if (D.next != kNone) blocks_[D.next].prev = dst;
    }
    D.size += S.size;
    drop_block(src);
    return true;
  }

  uint64_t expandable_size(int32_t b) const {
    const Block& B = blocks_[b];
    return B.size + (B.next != kNone && !blocks_[B.next].mapped ? blocks_[B.next].size : 0);
  }

  int32_t get_free_block(Pool& pool, uint64_t size) {
    if (pool.free.empty()) return kNone;
    FreeIndex::Pos it = pool.free.lower_bound(size_addr_key(size, 0));
    if (pool.free.at_end(it)) return kNone;
    if (o_.expandable_segments) {
      // a block that can still grow into unmapped space counts with that space for best fit
      for (FreeIndex::Pos nx = pool.free.next(it);
           !pool.free.at_end(nx) && expandable_size(pool.free.val(nx)) <
                                        expandable_size(pool.free.val(it));
           nx = pool.free.next(nx)) {
        it = nx;
      }
    }
    const uint64_t bsize = key_size(pool.free.key(it));
    const uint64_t mss = o_.max_split_size;
    if (size < mss && bsize >= mss) return kNone;  // no oversize block for a smaller request
    if (size >= mss && bsize >= size + kLargeBuffer) return kNone;
    const int32_t b = pool.free.val(it);
    pool.free.erase(it);
    return b;
  }

  int32_t alloc_block(Pool& pool, uint64_t size, uint64_t alloc_size) {
    if (o_.expandable_segments) return try_allocate_expandable_block(pool, size);
    if (!fits(alloc_size)) return kNone;
    const int32_t b = new_block(next_va_, alloc_size, kNone, kNone, pool.small, true);
    note_segment(AllocSimLayout::kSegmentAlloc, next_va_, alloc_size, pool.small);
    next_va_ += round_up(alloc_size, kRoundLarge);
    reserved_ += int64_t(alloc_size);
    segments_++;
    note_segments();
    s_.num_device_alloc++;
    return b;
  }

  void release_block(Pool& pool, int32_t b) {  // cudaFree a whole, free segment
    pool.free.erase_key(key_of(b));
    note_segment(AllocSimLayout::kSegmentFree, blocks_[b].addr, blocks_[b].size, pool.small);
    reserved_ -= int64_t(blocks_[b].size);
    segments_--;
    s_.num_device_free++;
    drop_block(b);
  }

  bool release_available_cached_blocks(Pool& pool, uint64_t size) {
    const uint64_t mss = o_.max_split_size;
    const uint64_t target = std::max(size, mss);
    if (pool.free.empty()) return false;
    FreeIndex::Pos it = pool.free.lower_bound(size_addr_key(target, 0));
    if (!pool.free.at_end(it)) {
      const int32_t b = pool.free.val(it);
      if (blocks_[b].prev != kNone || blocks_[b].next != kNone) return false;
      release_block(pool, b);
      return true;
    }
    // no single block is large enough: release oversize blocks, largest first
    collect_free_blocks(pool);
    uint64_t released = 0;
    for (auto r = scratch_.rbegin(); r != scratch_.rend() && released < target; ++r) {
      const Block& B = blocks_[*r];
      if (B.size < mss) break;
      if (B.prev != kNone || B.next != kNone) continue;
      released += B.size;
      release_block(pool, *r);
    }
    return released >= target;
  }

  // scratch_ = the pool's free blocks in (size, address) order; releasing then edits the index
  void collect_free_blocks(const Pool& pool) {
    scratch_.clear();
    for (FreeIndex::Pos q = pool.free.begin(); !pool.free.at_end(q); q = pool.free.next(q)) {
      scratch_.push_back(pool.free.val(q));
    }
  }

  void release_cached_blocks() {
    for (Pool* pool : {&large_, &small_}) {
      collect_free_blocks(*pool);
      for (const int32_t b : scratch_) {
        if (!blocks_[b].live || blocks_[b].allocated || !blocks_[b].mapped) continue;
        if (o_.expandable_segments) {
          unmap_block(*pool, b);
          if (blocks_[b].prev == kNone && blocks_[b].next == kNone && !blocks_[b].mapped) {
            pool->unmapped.erase(blocks_[b].addr);  // nothing mapped: drop the segment
            drop_block(b);
            segments_--;
          }
        } else if (blocks_[b].prev == kNone && blocks_[b].next == kNone) {
          release_block(*pool, b);
        }
      }
    }
  }

  // ---- expandable segments -----------------------------------------------------------------
  int32_t find_expandable_block(Pool& pool, uint64_t size) {
    for (const auto& kv : pool.unmapped) {
      int32_t c = kv.second;
      const int32_t pv = blocks_[c].prev;
      if (pv != kNone && !blocks_[pv].allocated) c = pv;
      uint64_t bytes = 0;
      for (int32_t b = c; bytes < size && b != kNone && !blocks_[b].allocated;
           b = blocks_[b].next) {
        bytes += blocks_[b].size;
      }
      if (bytes >= size) return c;
    }
    const uint64_t base = round_up(next_va_, pool.page);
    const uint64_t span = round_up(std::max(kExpandableSpan, size), pool.page);
    next_va_ = base + span;
    const int32_t c = new_block(base, span, kNone, kNone, pool.small, false);
    pool.unmapped.emplace(base, c);
    segments_++;
    note_segments();
    return c;
  }

  bool map_block(Pool& pool, int32_t b, uint64_t size) {
    uint64_t bytes = std::min(round_up(size, pool.page), blocks_[b].size);
    if (!fits(bytes)) return false;
    pool.unmapped.erase(blocks_[b].addr);
    note_segment(AllocSimLayout::kSegmentMap, blocks_[b].addr, bytes, pool.small);
    blocks_[b].mapped = true;
    if (bytes < blocks_[b].size) {
      const int32_t r = new_block(blocks_[b].addr + bytes, blocks_[b].size - bytes, b,
                                  blocks_[b].next, pool.small, false);
      Block& B = blocks_[b];
      if (B.next != kNone) blocks_[B.next].prev = r;
      B.next = r;
      B.size = bytes;
      pool.unmapped.emplace(blocks_[r].addr, r);
    }
    try_merge(b, blocks_[b].prev, pool);
    try_merge(b, blocks_[b].next, pool);
    pool.free.insert(key_of(b), b);
    reserved_ += int64_t(bytes);
    s_.num_device_alloc++;
    return true;
  }

  int32_t try_allocate_expandable_block(Pool& pool, uint64_t size) {
    int32_t c = find_expandable_block(pool, size);
    if (!blocks_[c].mapped && !map_block(pool, c, std::min(blocks_[c].size, size))) return kNone;
    while (blocks_[c].size < size) {  // c is free and mapped, followed by unmapped space
      const uint64_t remaining = size - blocks_[c].size;
      const int32_t nc = blocks_[c].next;
      if (!map_block(pool, nc, std::min(remaining, blocks_[nc].size))) return kNone;
      c = nc;  // nc absorbed c
    }
    pool.free.erase_key(key_of(c));
    return c;
  }

  void unmap_block(Pool& pool, int32_t b) {  // unmap the fully free pages of free block b
    const uint64_t begin = round_up(blocks_[b].addr, pool.page);
    const uint64_t end = (blocks_[b].addr + blocks_[b].size) / pool.page * pool.page;
    if (begin >= end) return;
    pool.free.erase_key(key_of(b));
    const uint64_t before = begin - blocks_[b].addr;
    const uint64_t after = blocks_[b].addr + blocks_[b].size - end;
    if (before > 0) {
      const int32_t f = new_block(blocks_[b].addr, before, blocks_[b].prev, b, pool.small, true);
      if (blocks_[f].prev != kNone) blocks_[blocks_[f].prev].next = f;
      blocks_[b].prev = f;
      pool.free.insert(key_of(f), f);
    }
    if (after > 0) {
      const int32_t f = new_block(end, after, b, blocks_[b].next, pool.small, true);
      if (blocks_[f].next != kNone) blocks_[blocks_[f].next].prev = f;
      blocks_[b].next = f;
      pool.free.insert(key_of(f), f);
    }
    blocks_[b].addr = begin;
    blocks_[b].size = end - begin;
    blocks_[b].mapped = false;
    try_merge(b, blocks_[b].prev, pool);
    try_merge(b, blocks_[b].next, pool);
    pool.unmapped.emplace(blocks_[b].addr, b);
    note_segment(AllocSimLayout::kSegmentUnmap, begin, end - begin, pool.small);
    reserved_ -= int64_t(end - begin);
    s_.num_device_free++;
  }

  AllocSimOptions o_;
  AllocSimLayout* layout_;  // optional: where blocks and segments went
  int64_t event_ = 0;       // input row being replayed
  AllocSimSummary s_;
  Pool small_{true, kSmallBuffer};
  Pool large_{false, kLargeBuffer};
  std::vector<Block> blocks_;
  std::vector<int32_t> free_slots_;
  std::vector<int32_t> scratch_;
  PtrMap live_;
  uint64_t next_va_ = 1ull << 40;  // simulated device addresses
  int64_t reserved_ = 0;
  int64_t allocated_ = 0;
  int64_t requested_ = 0;
  int64_t segments_ = 0;
};

}  // namespace

AllocSimSummary simulate_allocator(const uint64_t* ptr, int64_t ptr_stride, const int64_t* size,
                                   int64_t size_stride, int64_t n, const AllocSimOptions& opts,
                                   int64_t* reserved_out, int64_t* allocated_out,
                                   AllocSimLayout* layout) {
  Simulator sim(opts, layout);
  return sim.run(ptr, ptr_stride, size, size_stride, n, reserved_out, allocated_out);
}

#ifndef MEMPROF_SIM_NO_PYTHON
namespace py = pybind11;

namespace {

// The Python side passes the ptr and size columns of an event array (EVENT_DTYPE, the Event of
// events.h) as strided views: read in place when they are element-aligned, as they are here.
static_assert(sizeof(Event) % 8 == 0 && offsetof(Event, ptr) % 8 == 0 &&
                  offsetof(Event, size) % 8 == 0,
              "the ptr and size columns of an Event array must be readable in place");

template <typename T>
py::array_t<T> usable_1d(py::array_t<T> a, const char* name) {
  if (a.ndim() != 1) {
    throw py::value_error(std::string(name) + ": expected a 1-D array, got " +
                          std::to_string(a.ndim()) + " dimensions");
  }
  // strided views (fields of a structured array) are read in place when element-aligned
  if (a.strides(0) % ssize_t(sizeof(T)) != 0 ||
      reinterpret_cast<uintptr_t>(a.data()) % alignof(T) != 0) {
    return py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
  }
  return a;
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> a(py::ssize_t(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

// The layout as numpy arrays: per input row block_addr / block_size, and the segment
// operations as parallel arrays (event, addr, size, action, small).
py::dict layout_dict(const AllocSimLayout& l) {
  std::vector<int64_t> ev, sz;
  std::vector<uint64_t> addr;
  std::vector<int8_t> action, small;
  for (const auto& e : l.segments) {
    ev.push_back(e.event);
    addr.push_back(e.addr);
    sz.push_back(int64_t(e.size));
    action.push_back(e.action);
    small.push_back(int8_t(e.small));
  }
  py::dict seg;
  seg["event"] = to_array(ev);
  seg["addr"] = to_array(addr);
  seg["size"] = to_array(sz);
  seg["action"] = to_array(action);
  seg["small"] = to_array(small);
  py::dict d;
  d["block_addr"] = to_array(l.block_addr);
  d["block_size"] = to_array(l.block_size);
  d["segments"] = seg;
  return d;
}

py::dict simulate_allocator_py(py::array_t<uint64_t> ptr_in, py::array_t<int64_t> size_in,
                               bool expandable_segments, uint64_t capacity,
                               uint64_t max_split_size, bool return_timeline,
                               bool return_layout) {
  py::array_t<uint64_t> ptr = usable_1d(ptr_in, "ptr");
  py::array_t<int64_t> size = usable_1d(size_in, "size");
  if (ptr.shape(0) != size.shape(0)) {
    throw py::value_error("ptr and size must have the same length, got " +
                          std::to_string(ptr.shape(0)) + " and " +
                          std::to_string(size.shape(0)));
  }
  const int64_t n = ptr.shape(0);
  AllocSimOptions opts;
  opts.expandable_segments = expandable_segments;
  opts.capacity = capacity;
  opts.max_split_size = max_split_size;  // 0: unlimited (the Simulator maps it)
  opts.record_timeline = return_timeline;

  py::array_t<int64_t> reserved, allocated;
  int64_t* res_out = nullptr;
  int64_t* alloc_out = nullptr;
  if (return_timeline) {
    reserved = py::array_t<int64_t>(n);
    allocated = py::array_t<int64_t>(n);
    res_out = reserved.mutable_data();
    alloc_out = allocated.mutable_data();
  }
  const uint64_t* pp = ptr.data();
  const int64_t* sp = size.data();
  const int64_t ps = n > 0 ? int64_t(ptr.strides(0)) / int64_t(sizeof(uint64_t)) : 1;
  const int64_t ss = n > 0 ? int64_t(size.strides(0)) / int64_t(sizeof(int64_t)) : 1;
  AllocSimSummary s;
  AllocSimLayout layout;
  {
    py::gil_scoped_release nogil;
    s = simulate_allocator(pp, ps, sp, ss, n, opts, res_out, alloc_out,
                           return_layout ? &layout : nullptr);
  }
  py::dict d;
  d["num_events"] = s.num_events;
  d["events_replayed"] = s.events_replayed;
  d["num_allocs"] = s.num_allocs;
  d["num_frees"] = s.num_frees;
  d["unknown_frees"] = s.unknown_frees;
  d["duplicate_allocs"] = s.duplicate_allocs;
  d["zero_size_events"] = s.zero_size_events;
  d["peak_allocated"] = s.peak_allocated;
  d["peak_requested"] = s.peak_requested;
  d["peak_reserved"] = s.peak_reserved;
  d["peak_reserved_event"] = s.peak_reserved_event;
  d["allocated_at_peak_reserved"] = s.allocated_at_peak_reserved;
  d["fragmentation_at_peak"] = s.fragmentation_at_peak;
  d["segments_at_peak"] = s.segments_at_peak;
  d["max_segments"] = s.max_segments;
  d["allocated_end"] = s.allocated_end;
  d["reserved_end"] = s.reserved_end;
  d["segments_end"] = s.segments_end;
  d["num_device_alloc"] = s.num_device_alloc;
  d["num_device_free"] = s.num_device_free;
  d["num_alloc_retries"] = s.num_alloc_retries;
  d["oom"] = s.oom;
  d["oom_event"] = s.oom_event;
  d["oom_bytes"] = s.oom_bytes;
  if (return_timeline) {
    if (s.events_replayed < n) {
      py::slice head(0, s.events_replayed, 1);
      d["reserved"] = reserved[head];
      d["allocated"] = allocated[head];
    } else {
      d["reserved"] = reserved;
      d["allocated"] = allocated;
    }
  } else {
    d["reserved"] = py::none();
    d["allocated"] = py::none();
  }
  d["layout"] = return_layout ? py::object(layout_dict(layout)) : py::object(py::none());
  return d;
}

}  // namespace

void register_allocator_sim(py::module_& m) {
  m.def("simulate_allocator", &simulate_allocator_py, py::arg("ptr"), py::arg("size"),
        py::kw_only(), py::arg("expandable_segments") = false, py::arg("capacity") = 0,
        py::arg("max_split_size") = 0, py::arg("return_timeline") = true,
        py::arg("return_layout") = false,
        R"doc(Replay allocation events through a model of PyTorch's CUDA caching allocator.

ptr: uint64 identities; size: int64, +bytes for an allocation, -bytes for its free (0: ignored).
capacity: bytes the allocator may reserve (0 = unlimited); max_split_size: bytes (0 = unlimited).
The replay stops at the first allocation that does not fit into capacity (oom=True).
return_layout: also return 'layout', a dict with 'block_addr' / 'block_size' (per input row:
where each allocation's block went and how large it is) and 'segments' (arrays event, addr,
size, action 1 alloc / 2 free / 3 map / 4 unmap, small) for a memory snapshot of the replay.
Returns a dict of summary numbers, plus 'reserved' and 'allocated' int64 arrays (the totals
after each replayed event) when return_timeline, else None. The GIL is released during the
replay.)doc");
}
#endif  // MEMPROF_SIM_NO_PYTHON

}  // namespace memprof

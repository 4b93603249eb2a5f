// Replay of an allocation event stream through a model of PyTorch's CUDA caching allocator
// (c10/cuda/CUDACachingAllocator.cpp), to predict reserved bytes and fragmentation on a GPU
// that is not present. Pure C++ (no Python, no torch); the pybind11 binding lives in
// allocator_sim.cpp.
#pragma once
#include <cstdint>
#include <limits>
#include <vector>

namespace memprof {

struct AllocSimOptions {
  bool expandable_segments = false;
  uint64_t capacity = 0;  // bytes the allocator may reserve; 0 = unlimited
  uint64_t max_split_size = std::numeric_limits<uint64_t>::max();  // "unlimited"
  bool record_timeline = true;
};

// Where the model put things, for a memory snapshot of the replay (optional, see below).
struct AllocSimLayout {
  enum Action : int8_t { kSegmentAlloc = 1, kSegmentFree = 2, kSegmentMap = 3, kSegmentUnmap = 4 };
  struct SegmentEvent {
    int64_t event;  // input row during which it happened (before that row's block is placed)
    uint64_t addr;
    uint64_t size;
    int8_t action;
    bool small;     // small pool (2 MiB segments)
  };
  std::vector<uint64_t> block_addr;    // per input row: address of the block an allocation got
  std::vector<int64_t> block_size;     // per input row: that block's size (rounded, maybe unsplit)
  std::vector<SegmentEvent> segments;  // cudaMalloc / cudaFree (or map / unmap), in order
};

struct AllocSimSummary {
  int64_t num_events = 0;       // events in the input
  int64_t events_replayed = 0;  // < num_events only when the replay stopped at an OOM
  int64_t num_allocs = 0;
  int64_t num_frees = 0;
  int64_t unknown_frees = 0;     // frees of a ptr that is not live: ignored
  int64_t duplicate_allocs = 0;  // allocation of a ptr that is still live: old one freed first
  int64_t zero_size_events = 0;  // size == 0: ignored
  int64_t peak_allocated = 0;    // bytes in allocated blocks (rounded), as memory_allocated()
  int64_t peak_requested = 0;    // bytes requested (unrounded)
  int64_t peak_reserved = 0;     // as memory_reserved()
  int64_t peak_reserved_event = -1;     // first event index where reserved reached its peak
  int64_t allocated_at_peak_reserved = 0;
  double fragmentation_at_peak = 0.0;   // 1 - allocated/reserved at peak_reserved_event
  int64_t segments_at_peak = 0;         // live segments at peak_reserved_event
  int64_t max_segments = 0;             // most live segments at any time
  int64_t allocated_end = 0;
  int64_t reserved_end = 0;
  int64_t segments_end = 0;
  int64_t num_device_alloc = 0;  // cudaMalloc calls (expandable: page-map calls)
  int64_t num_device_free = 0;   // cudaFree calls (expandable: page-unmap calls)
  int64_t num_alloc_retries = 0; // cache flushes (release of all unused segments) before a retry
  bool oom = false;
  int64_t oom_event = -1;        // index of the allocation that could not be served
  int64_t oom_bytes = 0;         // its requested size
};

// Replays n events: size[i] > 0 allocates size[i] bytes under identity ptr[i], size[i] < 0
// frees ptr[i], size[i] == 0 is ignored. Strides are in elements. The replay stops at the
// first OOM (as the program would). When opts.record_timeline, reserved_out/allocated_out
// (n entries each, may be null) receive the totals after each event. With a layout, the
// address and size of each allocation's block and every segment operation are recorded too
// (rows that are not allocations keep address 0 and size 0).
AllocSimSummary simulate_allocator(const uint64_t* ptr, int64_t ptr_stride, const int64_t* size,
                                   int64_t size_stride, int64_t n, const AllocSimOptions& opts,
                                   int64_t* reserved_out, int64_t* allocated_out,
                                   AllocSimLayout* layout = nullptr);

}  // namespace memprof

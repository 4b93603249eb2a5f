// Mapped memory for the event log's chunks, faulted in ahead of the thread that writes them.
//
// An event chunk is one 2 MiB huge page. The first write to a fresh page makes the kernel
// zero it - and, in a virtual machine, the host back it - inside the allocation that happened
// to fill the last chunk: 0.25 ms per chunk where the host memory was touched before, 1.5 to
// 17 ms where it was not (scratch first-touch timings on this 2-core VM), against 2-3 ms of
// recording per chunk at ~80 ns per event. A worker thread, started with a session's second
// huge chunk, keeps two chunks mapped and touched; the writer takes one under a lock once
// per chunk and maps its own only when none is ready. The kernel's work is the same; it runs
// beside the training thread instead of inside a step.
#pragma once

#include <cstddef>
#include <cstdint>

namespace memprof {

constexpr size_t kHugePage = size_t{2} << 20;

// A chunk's mapped length: a whole huge page when it is at least half of one (the event log's
// chunks), else its size (the kernel rounds to pages).
constexpr size_t mapped_length(size_t bytes) {
  return bytes >= kHugePage / 2 ? (bytes + kHugePage - 1) / kHugePage * kHugePage : bytes;
}

// Anonymous zeroed memory for a chunk of `bytes`; `huge`: aligned to a huge page and offered
// to the kernel as one. Throws std::bad_alloc when the kernel refuses.
void* map_chunk(size_t bytes, bool huge);
void unmap_chunk(void* p, size_t bytes);

// One huge page (kHugePage bytes, aligned, zeroed): the worker's when one is ready, else
// mapped here. Starts the worker at the second call after start_chunk_pool().
void* take_huge_chunk();

// A session starts: the counts below from 0 (the worker starts with the second take).
void start_chunk_pool();
// A session stops: the worker is joined and the chunks it kept ready are unmapped.
void stop_chunk_pool();

struct ChunkPoolCounts {
  int64_t ready;    // huge chunks the writers took from the worker, this session
  int64_t mapped;   // huge chunks the writers mapped themselves (none was ready)
};
ChunkPoolCounts chunk_pool_counts();

// fork(): the pool's lock held across it (the worker takes it briefly); the child, which has
// no worker, gets an idle pool.
void lock_chunk_pool_for_fork();
void unlock_chunk_pool_after_fork();
void reset_chunk_pool_in_child();

}  // namespace memprof

// The sizes of the CPU blocks memprof hands out while it records (FreeWatchingAllocator in
// tracker.cpp), so that a block's free is recorded with its size, on whatever thread frees it,
// and the running total of CPU bytes stays right.
//
// PyTorch's CPU allocator keeps such a map itself, but only while the profiler slot asks for
// memory reports (memoryProfilingEnabled), and then per allocation and per free it takes one
// process-wide mutex, allocates or frees a hash node, and looks up the slot twice before a
// virtual report: about a quarter of the instructions the hook points add to an op-bound step
// (benchmarks/step_instructions.py). memprof's hook declines those reports and notes the blocks
// here instead: one table under a spin lock, with no allocation per block (the table grows by
// doubling).
#pragma once

#include <cstdint>

namespace memprof {

// Notes the size of the block at `ptr` (any thread); returns cpu_block_bytes() after it.
// `reported`: a block the CPU allocator reported (one of its default allocator's, taken
// without the wrapper), whose free is seen only while a session's hook is on the freeing
// thread: such notes last one session (forget_reported_cpu_blocks).
int64_t note_cpu_block(void* ptr, int64_t nbytes, bool reported = false);
// The size noted for the block at `ptr`, forgotten (0 when none was noted); `total` gets
// cpu_block_bytes() after it.
int64_t take_cpu_block(void* ptr, int64_t* total);
// Bytes of the blocks noted and not yet taken: the CPU allocator's total, as memprof sees it.
int64_t cpu_block_bytes();
// Drops the notes of reported blocks (a session starts): one freed after the last session
// went unseen and stayed counted for good, session after session. A reported block still
// alive is in the new session's baseline.
void forget_reported_cpu_blocks();
// Held around fork(): a child must not find a shard locked by a thread it does not have.
void lock_cpu_blocks_for_fork();
void unlock_cpu_blocks_after_fork();

}  // namespace memprof

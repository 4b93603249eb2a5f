// The fixed-size event record shared by the tracker, the allocator simulator and the Python
// side (memprof.events.EVENT_DTYPE mirrors this layout field by field).
#pragma once
#include <cstdint>

namespace memprof {

constexpr int32_t kPhaseOther = 0;
constexpr int32_t kPhaseForward = 1;
constexpr int32_t kPhaseBackward = 2;
constexpr int32_t kPhaseOptimizer = 3;

constexpr int8_t kKindMemory = 0;       // size > 0: allocation, size < 0: free
constexpr int8_t kKindOutOfMemory = 1;  // size: the request that failed
constexpr int8_t kKindMark = 2;         // zero-size marker from the Python side; op = label

struct Event {
  int64_t t_ns;             // steady clock
  uint64_t ptr;             // address (identity of the block)
  int64_t size;             // signed bytes
  int64_t total_allocated;  // as the allocator reports it after this event
  int64_t total_reserved;   // CUDA caching allocator only
  int64_t seq;              // autograd sequence number (forward op's node / running node)
  int32_t op;               // string id: outermost op (forward) or first op of the node
  int32_t leaf_op;          // string id: innermost op
  int32_t node;             // string id: running autograd node in backward, else -1
  int32_t module;           // module id from the Python module scope stack, else -1
  int32_t step;
  int32_t thread;
  int8_t device_type;
  int8_t device_index;
  int8_t phase;
  int8_t kind;
  int32_t reserved_pad;
};
static_assert(sizeof(Event) == 80, "Event layout is mirrored in Python");

}  // namespace memprof

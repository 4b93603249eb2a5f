// The fixed-size records and the constants shared by the tracker, the allocator simulator and
// the Python side. Defined here once: memprof._C exports the constants and each record's layout
// (field name, byte offset, numpy format, size; computed below with offsetof/sizeof), and
// memprof/record/events.py builds its numpy dtypes from that export and checks them at import.
#pragma once
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace memprof {

// Phase of the step an event belongs to; the value indexes kPhaseNames.
enum Phase : int32_t { kPhaseOther, kPhaseForward, kPhaseBackward, kPhaseOptimizer, kNumPhases };
constexpr std::array kPhaseNames{"other", "forward", "backward", "optimizer"};
static_assert(kPhaseNames.size() == kNumPhases, "one name per phase");

constexpr int8_t kKindMemory = 0;       // size > 0: allocation, size < 0: free
constexpr int8_t kKindOutOfMemory = 1;  // size: the request that failed; ptr: events dropped before
constexpr int8_t kKindMark = 2;         // zero-size marker from the Python side; op = label

// One allocation, free, OOM report or marker. Widest fields first: no padding anywhere, so
// every byte the Python side sees was written by record().
struct Event {
  int64_t t_ns;             // steady clock
  uint64_t ptr;             // address (identity of the block)
  int64_t size;             // signed bytes
  int64_t total_allocated;  // as the allocator reports it after this event
  int64_t total_reserved;   // CUDA caching allocator only
  int64_t seq;              // autograd sequence number (forward op's node / running node)
  int32_t op;               // string id: outermost op (forward) or first op of the node
  int32_t node;             // string id: running autograd node in backward, else -1
  int32_t module;           // module id from the Python module scope stack, else -1
  int32_t step;
  int32_t thread;
  int8_t device_type;       // c10::DeviceType
  int8_t device_index;
  int8_t phase;             // Phase
  int8_t kind;              // kKind*
};

// The forward op that created an autograd node (sequence number), recorded once per forward op.
struct SeqRecord {
  int64_t seq;
  int32_t op;
  int32_t module;
  int32_t thread;
  int32_t pad = 0;  // the record is 8-byte aligned; an explicit, zeroed tail (numpy drops
                    // unnamed gaps when it concatenates structured arrays)
};

// ---------------------------------------------------------------------------------------------
// Record layouts as numpy sees them.
struct FieldLayout {
  const char* name;
  size_t offset;
  const char* format;  // numpy type string
  size_t size;
};

static_assert(std::endian::native == std::endian::little, "the numpy formats below say '<'");

template <typename T>
constexpr const char* numpy_format() {
  static_assert(std::is_integral_v<T>, "records hold integers only");
  constexpr bool s = std::is_signed_v<T>;
  switch (sizeof(T)) {
    case 1: return s ? "<i1" : "<u1";
    case 2: return s ? "<i2" : "<u2";
    case 4: return s ? "<i4" : "<u4";
    default: return s ? "<i8" : "<u8";
  }
}

#define MEMPROF_FIELD(Record, member)                                             \
  FieldLayout {                                                                   \
    #member, offsetof(Record, member), numpy_format<decltype(Record::member)>(), \
        sizeof(Record::member)                                                    \
  }

constexpr std::array kEventLayout{
    MEMPROF_FIELD(Event, t_ns),         MEMPROF_FIELD(Event, ptr),
    MEMPROF_FIELD(Event, size),         MEMPROF_FIELD(Event, total_allocated),
    MEMPROF_FIELD(Event, total_reserved), MEMPROF_FIELD(Event, seq),
    MEMPROF_FIELD(Event, op),           MEMPROF_FIELD(Event, node),
    MEMPROF_FIELD(Event, module),       MEMPROF_FIELD(Event, step),
    MEMPROF_FIELD(Event, thread),       MEMPROF_FIELD(Event, device_type),
    MEMPROF_FIELD(Event, device_index), MEMPROF_FIELD(Event, phase),
    MEMPROF_FIELD(Event, kind),
};

constexpr std::array kSeqRecordLayout{
    MEMPROF_FIELD(SeqRecord, seq),    MEMPROF_FIELD(SeqRecord, op),
    MEMPROF_FIELD(SeqRecord, module), MEMPROF_FIELD(SeqRecord, thread),
    MEMPROF_FIELD(SeqRecord, pad),
};

#undef MEMPROF_FIELD

// True when the fields, in order, tile the record's bytes exactly: a member missing from the
// layout list (or padding the compiler put in) fails to compile instead of drifting.
template <typename Record, size_t N>
constexpr bool tiles_record(const std::array<FieldLayout, N>& fields) {
  size_t end = 0;
  for (const FieldLayout& f : fields) {
    if (f.offset != end) return false;
    end += f.size;
  }
  return end == sizeof(Record) && std::has_unique_object_representations_v<Record>;
}

static_assert(tiles_record<Event>(kEventLayout), "kEventLayout must list every Event field");
static_assert(tiles_record<SeqRecord>(kSeqRecordLayout), "kSeqRecordLayout must list every field");
static_assert(sizeof(Event) == 72 && sizeof(SeqRecord) == 24);

}  // namespace memprof

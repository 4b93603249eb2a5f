// memprof native tracker: every allocation and free of the CPU allocator and of the CUDA
// caching allocator, stamped with the op, module, autograd node, phase, step and thread that
// made it, written as fixed-size records into per-thread buffers.
//
// Two hook points, both device-agnostic (so CI on a CPU runs the code a GPU user runs):
//  * c10::MemoryReportingInfoBase pushed as PROFILER_STATE thread-local debug info: the CPU
//    allocator and the CUDA caching allocator report every alloc/free (and CUDA OOM) to it.
//    The debug info travels with at::ThreadLocalState into autograd worker threads.
//  * a global RecordFunction callback that keeps a per-thread op stack, so each allocation is
//    stamped with the running op and, inside backward, with the autograd node (and through its
//    sequence number, the forward op that created the node).
#include <ATen/SequenceNumber.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Logging.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <pybind11/numpy.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/profiler/orchestration/observer.h>
#include <pybind11/stl.h>

#include <pthread.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "address_watch.h"
#include "bindings.h"
#include "chunk_pool.h"
#include "cpu_blocks.h"
#include "events.h"
#include "name_cache.h"

namespace py = pybind11;

namespace memprof {
namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---------------------------------------------------------------------------------------------
// Per-thread record logs in fixed-size chunks, written by their thread only: an append is a
// plain store plus a release store of the count, no lock and no atomic read-modify-write (the
// per-event cost is what the user pays). Readers (a drain while recording, the take after
// stop) read the published count with acquire and walk the chunk chain, which only grows.
// The take frees every chunk except the one the writer may still be in (a thread finishing
// an allocation as the session stops): that one goes with the log.
template <typename Record, size_t kChunk>
struct RecordLog {
  using value_type = Record;
  static constexpr size_t kChunkRecords = kChunk;
  struct Chunk {
    Record records[kChunk];
    std::atomic<Chunk*> next{nullptr};

    // Chunks are mapped pages of their own, not heap blocks: glibc serves a block of this size
    // from its heap once it has freed one mapping, and a heap does not give freed memory back
    // while the merge runs, so leaving a block would hold the events twice after all. An
    // event chunk fills one 2 MiB huge page where the kernel offers them (transparent huge
    // pages, "madvise" mode included): the first write to each 4 KiB page otherwise costs a
    // page fault, ~25 ns per 72-byte event on this machine's VM against ~3 with one fault per
    // chunk (scratch measurement; benchmarks/per_event.py shows the effect on the whole path),
    // and that one fault comes from chunk_pool's worker, ahead of the writer, where it can.
    // A log's first chunk takes small pages unless huge_first is set (see map_chunk).
    static Chunk* create(bool huge) {
      void* p = huge && mapped_length(sizeof(Chunk)) == kHugePage
                    ? take_huge_chunk()
                    : map_chunk(sizeof(Chunk), huge);
      return new (p) Chunk;
    }
    static void destroy(Chunk* c) {
      c->~Chunk();
      unmap_chunk(c, sizeof(Chunk));
    }
  };
  // (the writer's fields first: with the quota before them, one line per append)
  Chunk* tail = nullptr;              // writer only
  size_t used = kChunk;               // writer only: records in tail (kChunk: none yet)
  std::atomic<size_t> count{0};       // records published
  bool huge_first = false;            // set before the first append: its chunk on a huge page
  std::atomic<Chunk*> head{nullptr};  // first chunk still held
  size_t head_first = 0;              // index of head's first record (reader side)
  size_t taken = 0;                   // records already handed out by take (reader side)

  RecordLog() = default;
  RecordLog(const RecordLog&) = delete;
  RecordLog& operator=(const RecordLog&) = delete;
  ~RecordLog() {
    for (Chunk* c = head.load(std::memory_order_acquire); c != nullptr;) {
      Chunk* next = c->next.load(std::memory_order_acquire);
      Chunk::destroy(c);
      c = next;
    }
  }

  void append(const Record& r) {
    if (used == kChunk) {
      Chunk* c = Chunk::create(/*huge=*/huge_first || tail != nullptr);
      if (tail == nullptr) {
        head.store(c, std::memory_order_release);
      } else {
        tail->next.store(c, std::memory_order_release);
      }
      tail = c;
      used = 0;
    }
    tail->records[used++] = r;
    count.store(count.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }

  // Calls copy(records, n) for the records [from, to) in order; `to` <= a published count.
  template <typename Copy>
  void visit(size_t from, size_t to, Copy&& copy) const {
    size_t first = head_first;
    for (Chunk* c = head.load(std::memory_order_acquire); c != nullptr && first < to;
         c = c->next.load(std::memory_order_acquire), first += kChunk) {
      size_t lo = std::max(from, first), hi = std::min(to, first + kChunk);
      if (lo < hi) copy(c->records + (lo - first), hi - lo);
    }
  }

  // Frees the chunks that hold only records before `upto` - 1 (all taken); the chunk of the
  // last taken record and any after it stay, since a late writer may still touch them.
  void release_before(size_t upto) {
    if (upto == 0) return;
    size_t keep_from = (upto - 1) / kChunk * kChunk;
    Chunk* c = head.load(std::memory_order_acquire);
    while (c != nullptr && head_first < keep_from) {
      Chunk* next = c->next.load(std::memory_order_acquire);
      Chunk::destroy(c);
      c = next;
      head_first += kChunk;
    }
    head.store(c, std::memory_order_release);
  }
};

// Admission against a session-wide cap without an atomic per record: a thread reserves
// kQuotaBatch records at a time from the shared counter (never more than the cap has left),
// and counts its drops in a field only it writes.
constexpr int64_t kQuotaBatch = 256;

struct Quota {
  int64_t left = 0;                  // writer only
  std::atomic<int64_t> dropped{0};   // written by the owner thread only, read by counters()

  bool admit(std::atomic<int64_t>& reserved, int64_t cap) {
    if (left == 0) {
      int64_t before = reserved.fetch_add(kQuotaBatch, std::memory_order_relaxed);
      left = std::clamp<int64_t>(cap - before, 0, kQuotaBatch);
    }
    if (left > 0) {
      --left;
      return true;
    }
    dropped.store(dropped.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    return false;
  }
};

// Each log beside its quota: an event's append reads and writes the first cache line only, a
// sequence record's the second (each is cold after the step's kernels).
struct alignas(64) ThreadBuffer {
  int32_t index = 0;
  Quota event_quota;
  // one 2 MiB page per event chunk (see RecordLog::Chunk::create)
  using EventLog = RecordLog<Event, (kHugePage - 64) / sizeof(Event)>;
  static_assert(sizeof(EventLog::Chunk) <= kHugePage, "an event chunk fills one huge page");
  EventLog events;
  Quota seq_quota;
  RecordLog<SeqRecord, 1 << 12> seqs;
};

// ---------------------------------------------------------------------------------------------
// Interned strings (op and node names). Lookups go through a per-thread cache keyed by the
// name pointer and verified by content, so the global lock is taken once per distinct name.
class StringTable {
 public:
  int32_t intern(const char* s) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = ids_.find(s);
    if (it != ids_.end()) return it->second;
    int32_t id = static_cast<int32_t>(names_.size());
    names_.emplace_back(s);
    ids_.emplace(names_.back(), id);
    return id;
  }
  std::vector<std::string> all() {
    std::lock_guard<std::mutex> lock(mu_);
    return names_;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    names_.clear();
    ids_.clear();
  }

 private:
  std::mutex mu_;
  std::vector<std::string> names_;
  std::unordered_map<std::string, int32_t> ids_;
};

// ---------------------------------------------------------------------------------------------
struct ThreadState;

// The first cache line holds what every event and op reads (each is cold after the step's
// kernels): one line, where the same fields spread over two.
struct alignas(64) Session {
  std::atomic<bool> active{false};
  // The hooks installed, their bodies empty (benchmarks/per_event.py, overhead_health.py: what
  // PyTorch's hook points cost by themselves, the floor under any tracker built on them);
  // records nothing.
  std::atomic<bool> hooks_only{false};
  std::atomic<bool> dropped_any{false};     // a memory event dropped on any thread (OOM reports)
  std::atomic<int32_t> phase{kPhaseOther};
  std::atomic<int32_t> step{0};
  std::atomic<uint64_t> generation{0};
  std::atomic<int64_t> events_reserved{0};  // handed out to threads' quotas (see Quota)
  int64_t capacity = 0;
  // The thread that set the phase (the training loop's): another thread's allocations take
  // it only while that thread runs a module (nn.DataParallel's replicas) or a backward node;
  // a logger or prefetch thread allocating during the forward is not making activations.
  std::atomic<const ThreadState*> phase_thread{nullptr};
  // Markers and sequence records are bounded too (at least kMinSideCap each, or the event
  // capacity): a run of 100k steps must not grow them without end after the event cap.
  std::atomic<int64_t> seqs_reserved{0};
  int64_t side_capacity = 0;
  std::atomic<int64_t> marks{0}, marks_dropped{0};
  // At step ends (the training thread's, see step_end): the allocated total then, and the
  // number of step ends in a row, up to this one, with more allocated than at the one before
  // (record.leak_probe looks then).
  int64_t step_end_total = -1;
  int32_t steps_growing = 0;
  std::mutex registry_mu;
  std::vector<std::shared_ptr<ThreadBuffer>> buffers;
  StringTable strings;
  at::CallbackHandle callback = 0;
  bool callback_installed = false;
  std::atomic<std::thread::id> owner{};   // read on every free by other threads
  std::shared_ptr<c10::DebugInfoBase> reporter;  // the one pushed on the owner thread
  int32_t backward_label = -1;                    // string id of "backward_start"
  std::atomic<int64_t> external_total{0};         // running total of record_external sizes
  int saved_log_level = 0;                        // c10 log level restored at stop()
};

// Created when the library loads and never destroyed (callbacks may run during exit); a plain
// pointer, so the hot path reads it without a function-local static's guard.
Session* const g_session = new Session();
inline Session& session() { return *g_session; }

// True while a session records: started and not hooks-only. What every hook and recording
// call asks first.
inline bool recording() {
  Session& s = session();
  return s.active.load(std::memory_order_acquire) && !s.hooks_only.load(std::memory_order_relaxed);
}

struct OpFrame {
  int32_t name;
  int64_t seq;
  bool backward;
};

// The first cache line holds what every event and op reads (a module's push alone reads the
// line after it, for its stack's capacity).
struct alignas(64) ThreadState {
  uint64_t generation = 0;
  int backward_depth = 0;
  int32_t index = 0;              // its buffer's: the thread's number in the session
  ThreadBuffer* buf = nullptr;    // the buffer's, without its owner's control block
  std::vector<OpFrame> ops;
  std::vector<int32_t> modules;
  std::shared_ptr<ThreadBuffer> buffer;
  NameCache names;   // op and node names by address (name_cache.h), this session
  // CUDA's caching allocator's running total of allocated bytes in its last report on this
  // thread: a plain store into state the report writes anyway, not a shared line every
  // allocating thread would write. (The CPU total is cpu_block_bytes().)
  int64_t cuda_total = 0;
};

// The state lives on the heap and the thread-local is a plain pointer, initial-exec: one
// register-relative load per access instead of a __tls_get_addr call and an init guard. It is
// freed by a thread-exit hook.
struct ThreadStateOwner {
  ThreadState* state = nullptr;
  ~ThreadStateOwner();
};
__attribute__((tls_model("initial-exec"))) thread_local ThreadState* tls_state = nullptr;
// Set when record() drops an allocation on this thread (its quota of the log is spent): the
// CPU allocator's wrapper (FreeWatchingAllocator) then marks that block (see unlogged_delete).
__attribute__((tls_model("initial-exec"))) thread_local bool tls_allocation_dropped = false;
// Set while the CPU allocator's wrapper allocates or frees a block it records itself: the CPU
// allocator is then told not to note and report it (Reporter::memoryProfilingEnabled).
__attribute__((tls_model("initial-exec"))) thread_local bool tls_declining_cpu_reports = false;
// Sets it for a scope (cleared however the scope is left).
struct DecliningCpuReports {
  DecliningCpuReports() { tls_declining_cpu_reports = true; }
  ~DecliningCpuReports() { tls_declining_cpu_reports = false; }
};
thread_local ThreadStateOwner tls_owner;
ThreadStateOwner::~ThreadStateOwner() {
  tls_state = nullptr;
  delete state;
}

inline ThreadState& tls() {
  if (__builtin_expect(tls_state == nullptr, 0)) {
    tls_owner.state = new ThreadState();
    tls_state = tls_owner.state;
  }
  return *tls_state;
}

bool attach_thread();  // below: pushes the allocation hook onto the calling thread

// Returns this thread's state for the current session, (re)registering it when a new session
// started since this thread last recorded. A thread that existed before the session started
// (a worker running backward, a thread pool) registers on its first op: the allocation hook is
// pushed onto it then, so its allocations are recorded like those of threads started later.
ThreadState& thread_state() {
  Session& s = session();
  ThreadState& ts = tls();
  uint64_t gen = s.generation.load(std::memory_order_acquire);
  if (ts.generation != gen) {
    ts.generation = gen;
    ts.ops.clear();
    ts.modules.clear();
    ts.backward_depth = 0;
    ts.cuda_total = 0;
    ts.names.clear();
    ts.buffer = std::make_shared<ThreadBuffer>();
    ts.buf = ts.buffer.get();   // at once: the old buffer's last owner was ts.buffer
    // the thread that started the session records most events (short sessions included);
    // other threads' first chunk takes small pages
    ts.buffer->events.huge_first =
        std::this_thread::get_id() == s.owner.load(std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(s.registry_mu);
      ts.buffer->index = static_cast<int32_t>(s.buffers.size());
      s.buffers.push_back(ts.buffer);
    }
    ts.index = ts.buf->index;
    attach_thread();
  }
  return ts;
}

// Whether `name` is the text of the schema `fn` runs under, as registered with the dispatcher
// (an op's, found again by its name): then it lives as long as the registration. Only on a
// slot's fill.
bool is_registered_schema_name(const at::RecordFunction& fn, const char* name) {
  try {
    std::optional<c10::OperatorName> op = fn.operator_name();
    if (!op) return false;
    std::optional<c10::OperatorHandle> handle = c10::Dispatcher::singleton().findOp(*op);
    return handle && handle->hasSchema() && handle->schema().name().c_str() == name;
  } catch (...) {
    return false;
  }
}

// Ops deregistered in the process (a torch.library.Library destroyed), counted by a listener
// on the dispatcher from the first start on: a thread's name cache drops the names it took
// unchecked when this moves (NameCache::note_deregistrations). Bumped before the schema's
// memory is freed.
std::atomic<uint64_t> g_op_deregistrations{0};

class DeregistrationCounter final : public c10::OpRegistrationListener {
 public:
  void onOperatorRegistered(const c10::OperatorHandle&) override {}
  void onOperatorDeregistered(const c10::OperatorHandle&) override {
    g_op_deregistrations.fetch_add(1, std::memory_order_release);
  }
};

void count_op_deregistrations() {
  // (kept for the process, never destroyed: the dispatcher may be gone at exit)
  static auto* handle = new c10::RegistrationHandleRAII(
      c10::Dispatcher::singleton().addRegistrationListener(
          std::make_unique<DeregistrationCounter>()));
  (void)handle;
}

// The id of `name`, through the thread's cache. `fn`: the RecordFunction the name is of (its
// schema's name may skip the content check); `literal`: a string literal of memprof's own.
__attribute__((always_inline)) inline NameRef name_of(ThreadState& ts, const char* name,
                                                      const at::RecordFunction* fn,
                                                      bool literal = false) {
  ts.names.note_deregistrations(g_op_deregistrations.load(std::memory_order_acquire));
  return ts.names.lookup(
      name, [](const char* text) { return session().strings.intern(text); },
      [&] { return literal || (fn != nullptr && is_registered_schema_name(*fn, name)); });
}

int32_t intern_cached(ThreadState& ts, const char* name, bool literal = false) {
  if (name == nullptr) return -1;
  return name_of(ts, name, nullptr, literal).id;
}

constexpr int64_t kMinSideCap = 1 << 20;

// True when one more record of a bounded kind may be kept; otherwise counts it as dropped.
bool admit(std::atomic<int64_t>& count, std::atomic<int64_t>& dropped, int64_t cap) {
  if (count.fetch_add(1, std::memory_order_relaxed) < cap) return true;
  dropped.fetch_add(1, std::memory_order_relaxed);
  return false;
}

// `label`: for markers, the string id carried in the op field.
void record(ThreadState& ts, int8_t kind, uint64_t ptr, int64_t size, int64_t total_allocated,
            int64_t total_reserved, c10::Device device, int32_t label = -1) {
  Session& s = session();
  // Markers do not count against the event cap (the analyses need every one of them) but
  // have their own bound, the side capacity; an out-of-memory report, the one event a
  // diagnosis cannot do without, is never dropped.
  if (kind == kKindMemory && !ts.buf->event_quota.admit(s.events_reserved, s.capacity)) {
    if (size > 0) tls_allocation_dropped = true;
    if (!s.dropped_any.load(std::memory_order_relaxed)) {   // read-mostly: no shared write
      s.dropped_any.store(true, std::memory_order_relaxed);
    }
    return;
  }
  if (kind == kKindMark && !admit(s.marks, s.marks_dropped, s.side_capacity)) return;
  Event e;
  e.t_ns = now_ns();
  e.ptr = ptr;
  e.size = size;
  e.total_allocated = total_allocated;
  e.total_reserved = total_reserved;
  e.op = -1;
  e.node = -1;
  e.seq = -1;
  // Inside backward: the innermost autograd node, and the first op it ran.
  // Outside: the outermost op (what the user called) and the outermost sequence number (the
  // autograd node this op will create).
  const auto& ops = ts.ops;
  if (!ops.empty()) {
    int node_at = -1;
    if (ts.backward_depth > 0) {
      for (int i = static_cast<int>(ops.size()) - 1; i >= 0; --i) {
        if (ops[i].backward) {
          node_at = i;
          break;
        }
      }
    }
    if (node_at >= 0) {
      e.node = ops[node_at].name;
      e.seq = ops[node_at].seq;
      e.op = node_at + 1 < static_cast<int>(ops.size()) ? ops[node_at + 1].name : ops[node_at].name;
    } else {
      e.op = ops.front().name;
      for (const auto& f : ops) {
        if (f.seq >= 0) {
          e.seq = f.seq;
          break;
        }
      }
    }
  }
  e.module = ts.modules.empty() ? -1 : ts.modules.back();
  e.step = s.step.load(std::memory_order_relaxed);
  e.thread = ts.index;
  e.device_type = static_cast<int8_t>(device.type());
  e.device_index = static_cast<int8_t>(device.index());
  int32_t phase = s.phase.load(std::memory_order_relaxed);
  if (ts.backward_depth > 0) {
    phase = kPhaseBackward;
  } else if (phase != kPhaseOther && ts.modules.empty() &&
             &ts != s.phase_thread.load(std::memory_order_relaxed)) {
    phase = kPhaseOther;
  }
  e.phase = static_cast<int8_t>(phase);
  e.kind = kind;
  if (kind == kKindMark) e.op = label;
  ts.buf->events.append(e);
}

// The CUDA blocks allocated while the log was full (their allocation dropped) and not freed
// since: what unlogged_delete tells of a CPU block, for the CUDA caching allocator, whose blocks
// memprof does not hand out (its deleter is not ours to mark). That allocator gives a freed
// block's address straight back to the next request of its size, so past the log's end most
// new blocks sit at a logged block's address. Filled only once the log is full; at most the
// live blocks, each added and removed under a lock (a CUDA allocation costs microseconds).
struct UnloggedCudaBlocks {
  std::mutex mutex;
  std::unordered_set<uint64_t> live;
  std::atomic<bool> any{false};   // read on every CUDA free: the lock only once one is noted
};
// Made when the library loads and never destroyed (frees may come at exit); a plain pointer, so
// a CUDA event reads it without a function-local static's guard.
UnloggedCudaBlocks* const g_unlogged_cuda_blocks = new UnloggedCudaBlocks();
inline UnloggedCudaBlocks& unlogged_cuda_blocks() { return *g_unlogged_cuda_blocks; }
// Held around every fork (as BaselineBlocks' lock): a child would find it locked for good.
void lock_unlogged_cuda_blocks_for_fork() { unlogged_cuda_blocks().mutex.lock(); }
void unlock_unlogged_cuda_blocks_after_fork() { unlogged_cuda_blocks().mutex.unlock(); }

void note_cuda_block(uint64_t ptr, int64_t size, bool dropped) {
  UnloggedCudaBlocks& b = unlogged_cuda_blocks();
  if (size > 0 && dropped) {
    std::lock_guard<std::mutex> lock(b.mutex);
    b.live.insert(ptr);
    b.any.store(true, std::memory_order_release);
  } else if (size < 0 && b.any.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(b.mutex);
    b.live.erase(ptr);
  }
}

void forget_unlogged_cuda_blocks() {
  UnloggedCudaBlocks& b = unlogged_cuda_blocks();
  std::lock_guard<std::mutex> lock(b.mutex);
  b.live.clear();
  b.any.store(false, std::memory_order_release);
}

// A request the allocator could not serve. Its ptr: memory events the log dropped before it
// (this thread's count, at least 1 where only another thread's were: CUDA's backward runs on
// its own thread; 0: none dropped), so the analyses can tell an OOM whose moment the log holds
// from one after it filled.
void record_out_of_memory(int64_t alloc_size, int64_t total_allocated, int64_t total_reserved,
                          c10::Device device) {
  ThreadState& ts = thread_state();
  const int64_t dropped = std::max<int64_t>(
      ts.buffer->event_quota.dropped.load(std::memory_order_relaxed),
      session().dropped_any.load(std::memory_order_relaxed) ? 1 : 0);
  record(ts, kKindOutOfMemory, static_cast<uint64_t>(dropped), alloc_size, total_allocated,
         total_reserved, device);
}

// ---------------------------------------------------------------------------------------------
// The allocation hook. PyTorch has one slot for it (PROFILER_STATE debug info), which
// torch.profiler also uses: the two cannot share it, so start() refuses while another profiler
// holds the slot. Code in PyTorch reads whatever sits in that slot as a profiler state
// (static_cast to ProfilerStateBase, e.g. autograd.Function.apply asking "is the profiler
// enabled?"), so the hook *is* one, configured as disabled: PyTorch's own profiler paths stay
// off. The CUDA caching allocator reports every block to it without asking; the CPU allocator
// asks first (memoryProfilingEnabled, below), and is told no for the blocks memprof's wrapper
// around it (FreeWatchingAllocator) records itself, for a fraction of what the CPU allocator's
// reports cost (cpu_blocks.h). CPU reports still arrive for blocks taken from PyTorch's default
// CPU allocator without the wrapper (torch.UntypedStorage(n): copy.deepcopy of a state dict,
// torch.load) and from allocators that report without asking (shared-memory storages).
class Reporter final : public torch::profiler::impl::ProfilerStateBase {
 public:
  explicit Reporter(uint64_t generation)
      : ProfilerStateBase(torch::profiler::impl::ProfilerConfig(
            torch::profiler::impl::ProfilerState::Disabled)),
        generation_(generation) {}

  torch::profiler::impl::ActiveProfilerType profilerType() override {
    return torch::profiler::impl::ActiveProfilerType::NONE;
  }

  bool live() const {
    Session& s = session();
    return s.active.load(std::memory_order_acquire) &&
           s.generation.load(std::memory_order_relaxed) == generation_;
  }

  void reportMemoryUsage(void* ptr, int64_t alloc_size, size_t total_allocated,
                         size_t total_reserved, c10::Device device) override {
    if (!records()) return;
    if (alloc_size > 0) note_allocation(reinterpret_cast<uint64_t>(ptr));   // gradient notes
    ThreadState& ts = thread_state();
    if (device.is_cuda()) tls_allocation_dropped = false;
    // a CPU block the CPU allocator reported is noted beside the wrapper's (its own total
    // counts only the blocks it noted): a later free memprof declines to have reported
    // (baseline_delete) takes it out of the total, and a session's start forgets it
    int64_t total = static_cast<int64_t>(total_allocated);
    if (device.is_cpu()) {
      if (alloc_size > 0) {
        total = note_cpu_block(ptr, alloc_size, /*reported=*/true);
      } else if (const int64_t noted = take_cpu_block(ptr, &total);
                 noted > 0 && noted != -alloc_size) {
        // the block noted here was freed where no hook of memprof's saw it (a thread from
        // before the session that never ran an op), and this free, of another size, is of a
        // block made unseen at its address, whose size PyTorch knows where it notes every
        // block (FLAGS_caffe2_report_cpu_memory_usage): the noted block's free is recorded
        // first, with its own size - taken for this one, the log paired it with the old
        // allocation and the difference stayed alive for good
        record(ts, kKindMemory, reinterpret_cast<uint64_t>(ptr), -noted, total,
               static_cast<int64_t>(total_reserved), device);
      }
    }
    record(ts, kKindMemory, reinterpret_cast<uint64_t>(ptr), alloc_size, total,
           static_cast<int64_t>(total_reserved), device);
    if (device.is_cuda()) {
      note_cuda_block(reinterpret_cast<uint64_t>(ptr), alloc_size, tls_allocation_dropped);
    }
    if (device.is_cuda()) ts.cuda_total = static_cast<int64_t>(total_allocated);
  }

  void reportOutOfMemory(int64_t alloc_size, size_t total_allocated, size_t total_reserved,
                         c10::Device device) override {
    if (!records()) return;
    record_out_of_memory(alloc_size, static_cast<int64_t>(total_allocated),
                         static_cast<int64_t>(total_reserved), device);
  }

  // Asked by the CPU allocator before it notes a block's size and reports it (and by nothing
  // else in PyTorch): no for the blocks FreeWatchingAllocator records itself, and in a
  // hooks-only session (it records nothing).
  bool memoryProfilingEnabled() const override {
    return !tls_declining_cpu_reports && records();
  }

  bool records() const { return live() && !session().hooks_only.load(std::memory_order_relaxed); }

 private:
  uint64_t generation_;
};

// A reporter of an ended session left on a thread that outlived it (a thread-pool worker
// attached while tracking) holds the slot but reports nothing: take it off, so a new session
// (or torch.profiler) can use the slot on that thread.
void pop_stale_reporter() {
  auto* current = c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE);
  auto* ours = dynamic_cast<Reporter*>(current);
  if (ours != nullptr && !ours->live()) {
    c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
  }
}

// ---------------------------------------------------------------------------------------------
// CPU blocks. The CPU allocator is wrapped (once, at the first start): while a session records,
// each block it hands out is recorded here, its size noted (cpu_blocks.h), and it carries a
// deleter of memprof's that records its free, with that size, on whatever thread frees it -
// gloo's worker threads free the reduce-scatter temporaries a collective allocated on the
// training thread, and a thread that never ran an op while tracking has no hook of its own
// (when the CPU allocator reported frees to the freeing thread's hook, those blocks stayed
// "alive" for good and the run seemed to leak communication buffers step after step). The
// data and context pointers stay equal, so PyTorch still treats the block as a plain one
// (copy-on-write clones, raw_allocate); outside a session the base allocator's blocks are
// handed out as they are, so an untracked program pays one virtual call per allocation.
//
// Where the base is PyTorch's default CPU allocator, a recording session takes its blocks from
// c10::alloc_cpu and gives them back to c10::free_cpu itself (`direct`): the allocator's own
// allocate() and deleter each ask the profiler slot whether to report the block (a walk of the
// thread's debug-info chain and a virtual call into the Reporter: ~4 cache lines, cold after
// each of the step's kernels), only to be told no. alloc_cpu does all the rest as before
// (alignment, zero-fill, huge pages). Not where that allocator reports by itself
// (FLAGS_caffe2_report_cpu_memory_usage) nor around any other base. Both fields in one line.
struct alignas(64) BaseCpuAllocator {
  std::atomic<c10::DeleterFnPtr> deleter{nullptr};   // the base's one deleter, once noted
  std::atomic<bool> direct{false};                   // set at each session's start
};
BaseCpuAllocator g_base;

// A CPU block's allocation (size > 0) or free (size < 0), with the total after it.
inline void record_cpu(void* ptr, int64_t size, int64_t total) {
  record(thread_state(), kKindMemory, reinterpret_cast<uint64_t>(ptr), size, total, 0,
         c10::Device(c10::DeviceType::CPU));
}

// The free of a CPU block: its noted size taken back (also after the session), and recorded
// with it - or with `nbytes` where the caller knows the size (a baseline block's). Returns
// the size noted (0: none, the wrapper did not make the block).
inline int64_t record_cpu_free(void* ptr, int64_t nbytes = 0) {
  int64_t total = 0;
  const int64_t noted = take_cpu_block(ptr, &total);
  if (nbytes <= 0) nbytes = noted;
  if (nbytes > 0 && recording()) record_cpu(ptr, -nbytes, total);
  return noted;
}

// The block back to the base allocator's own deleter, which is told not to report it to
// memprof. (Another profiler's hook on the freeing thread - torch.profiler after the session -
// is still told of a block the allocator noted: baseline_delete's blocks may be such.)
inline void base_delete(void* ptr) {
  DecliningCpuReports declining;
  g_base.deleter.load(std::memory_order_relaxed)(ptr);
}

// A block with a deleter of the wrapper's back to the base: one the wrapper noted (made in a
// session, which the base never noted) goes straight to free_cpu where that is all the base's
// deleter would do (see g_base); one it did not - oneDNN's memory freed through raw_deleter,
// made outside any session, perhaps under torch.profiler - goes through that deleter, which
// takes its size back and reports the free to a profiler recording then.
inline void wrapper_delete(void* ptr, int64_t noted) {
  if (noted > 0 && g_base.direct.load(std::memory_order_relaxed)) {
    c10::free_cpu(ptr);
    return;
  }
  base_delete(ptr);
}

// The free is recorded before the block goes back: another thread's next allocation may be
// given its address.
void watched_delete(void* ptr) { wrapper_delete(ptr, record_cpu_free(ptr)); }

// The deleter of a block whose allocation the log dropped (it was full). Snapshots taken past
// the log's end ask for it (allocated_past_the_log): such a block's address can be that of a
// logged block whose free was dropped too, and the analyses, which match snapshots to the
// log by address, named that logged block with the snapshot's category (a step's activation
// read "gradients" when its address held a gradient after the log filled). Its free is
// recorded as watched_delete's is (the total stays right); the two must stay distinct
// functions (register_tracker checks it: a linker folding identical code would make every
// block read as dropped).
void unlogged_delete(void* ptr) {
  const int64_t noted = record_cpu_free(ptr);
  wrapper_delete(ptr, noted);
}

class FreeWatchingAllocator final : public c10::Allocator {
 public:
  explicit FreeWatchingAllocator(c10::Allocator* base) : base_(base) {}
  c10::Allocator* base() const { return base_; }

  c10::DataPtr allocate(size_t n) override {
    if (!recording()) return base_->allocate(n);
    if (n > 0 && g_base.direct.load(std::memory_order_relaxed)) return allocate_direct(n);
    c10::DataPtr block;
    try {
      DecliningCpuReports declining;
      block = base_->allocate(n);
    } catch (const c10::Error&) {
      // (the CPU allocator reports its out-of-memory only where it reports blocks)
      record_out_of_memory(static_cast<int64_t>(n), cpu_block_bytes(), 0,
                           c10::Device(c10::DeviceType::CPU));
      throw;
    }
    if (block.get() == nullptr || block.get() != block.get_context()) return block;
    c10::DeleterFnPtr base_deleter = block.get_deleter();
    // the base allocator's one deleter, noted the first time (a plain load after that: no
    // locked instruction per allocation); a block with another one is neither recorded nor
    // watched (its free would not pass here)
    c10::DeleterFnPtr noted = g_base.deleter.load(std::memory_order_relaxed);
    if (noted == nullptr && g_base.deleter.compare_exchange_strong(noted, base_deleter)) {
      noted = base_deleter;   // (a failed exchange leaves the one noted meanwhile in `noted`)
    }
    if (noted != base_deleter || !block.compare_exchange_deleter(base_deleter, &watched_delete)) {
      return block;
    }
    return recorded(std::move(block), n);
  }

  // Whether the blocks of `base` may bypass it while recording (see g_base).
  static bool may_bypass(c10::Allocator* base) {
    c10::Allocator* plain = c10::GetDefaultCPUAllocator();
    return base == plain && plain->raw_deleter() == g_base.deleter.load() &&
           !FLAGS_caffe2_report_cpu_memory_usage;
  }
  // What raw_deallocate frees with: oneDNN's scratch memory (raw_allocate, whose block drops
  // the deleter allocate() gave it) is recorded like any block, so its free must be too.
  // A block of the base allocator not recorded passes straight on (take_cpu_block finds none).
  c10::DeleterFnPtr raw_deleter() const override {
    c10::DeleterFnPtr base = base_->raw_deleter();
    return base != nullptr && base == g_base.deleter.load(std::memory_order_relaxed)
               ? &watched_delete : base;
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base_->copy_data(dest, src, count);
  }

 private:
  c10::DataPtr allocate_direct(size_t n) {
    void* ptr = nullptr;
    try {
      ptr = c10::alloc_cpu(n);
    } catch (const c10::Error&) {
      record_out_of_memory(static_cast<int64_t>(n), cpu_block_bytes(), 0,
                           c10::Device(c10::DeviceType::CPU));
      throw;
    }
    return recorded(c10::DataPtr(ptr, ptr, &watched_delete, c10::Device(c10::DeviceType::CPU)), n);
  }

  // A block carrying watched_delete, recorded (marked unlogged where the log dropped it).
  static c10::DataPtr recorded(c10::DataPtr block, size_t n) {
    void* ptr = block.get();
    note_allocation(reinterpret_cast<uint64_t>(ptr));   // gradient notes
    const int64_t total = note_cpu_block(ptr, static_cast<int64_t>(n));
    tls_allocation_dropped = false;
    record_cpu(ptr, static_cast<int64_t>(n), total);
    if (tls_allocation_dropped) (void)block.compare_exchange_deleter(&watched_delete, &unlogged_delete);
    return block;
  }

  c10::Allocator* base_;
};

// ---------------------------------------------------------------------------------------------
// Frees of blocks from before the session. The CPU allocator reports a free with the size it
// noted when the block was made, and it notes sizes only while someone profiles: a parameter,
// buffer or optimizer state made before tracking is freed without any report. The session's
// baseline lists those blocks (one synthetic allocation each), so without their frees they
// stayed "alive" to the end, and a new block the allocator placed at the same address looked
// like a second live one there (model.double() freeing the old buffers). The tracker gives
// each such block a deleter that reports its free, with the size the baseline noted, and then
// runs the allocator's own one. The base deleter's report of the same block (it has one when
// the block was made under another profiler) is skipped on that thread.
struct BaselineBlocks {
  std::mutex mutex;
  std::unordered_map<void*, int64_t> nbytes;   // data pointer (= context) -> size noted
};
BaselineBlocks& baseline_blocks() {
  static auto* blocks = new BaselineBlocks();   // never destroyed: frees may come at exit
  return *blocks;
}
// A fork while another thread holds the lock would leave the child's copy locked (and the map
// perhaps half-changed): the lock is taken around every fork, and given back on both sides.
void lock_baseline_blocks_for_fork() { baseline_blocks().mutex.lock(); }
void unlock_baseline_blocks_after_fork() { baseline_blocks().mutex.unlock(); }

// Replaces the CPU allocator's own deleter (g_base.deleter, which it then calls) on a block
// of the baseline.
void baseline_delete(void* ptr) {
  int64_t nbytes = 0;
  {
    BaselineBlocks& b = baseline_blocks();
    std::lock_guard<std::mutex> lock(b.mutex);
    auto it = b.nbytes.find(ptr);
    if (it != b.nbytes.end()) {
      nbytes = it->second;
      b.nbytes.erase(it);
    }
  }
  // (a block with a size noted - one an earlier session's full log dropped, one the CPU
  // allocator reported - leaves the total with it)
  record_cpu_free(ptr, nbytes);
  // (a block the CPU allocator noted itself would be recorded twice; never free_cpu directly:
  // the block was made before memprof looked, perhaps under torch.profiler, and the
  // allocator's deleter must take its size back and report its free to a profiler then)
  base_delete(ptr);
}

// The pre-existing CPU blocks of a session's baseline (tensors): each block of the CPU
// allocator (data and context pointers equal, its plain deleter) has its free reported from
// now on. Returns how many blocks are watched (those watched by an earlier session included).
int64_t watch_baseline_frees(const py::list& tensors) {
  c10::Allocator* allocator = c10::GetCPUAllocator();
  if (auto* wrapper = dynamic_cast<FreeWatchingAllocator*>(allocator)) allocator = wrapper->base();
  // the allocator's one deleter, as FreeWatchingAllocator notes it (a block with another one
  // is not watched)
  c10::DeleterFnPtr plain = allocator->raw_deleter();
  c10::DeleterFnPtr noted = g_base.deleter.load(std::memory_order_relaxed);
  if (noted == nullptr && plain != nullptr && g_base.deleter.compare_exchange_strong(noted, plain)) {
    noted = plain;
  }
  if (noted == nullptr) return 0;
  int64_t watched = 0;
  BaselineBlocks& b = baseline_blocks();
  for (py::handle item : tensors) {
    if (!THPVariable_Check(item.ptr())) continue;
    const at::Tensor& t = THPVariable_Unpack(item.ptr());
    if (!t.has_storage() || !t.device().is_cpu()) continue;
    c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
    c10::DataPtr& data = storage->_mutable_data_ptr_no_checks();
    if (data.get() == nullptr || data.get() != data.get_context()) continue;
    auto nbytes = static_cast<int64_t>(storage->nbytes());
    std::lock_guard<std::mutex> lock(b.mutex);
    c10::DeleterFnPtr current = data.get_deleter();
    if (current == &baseline_delete) {   // an earlier session's: its size today
      b.nbytes[data.get()] = nbytes;
      ++watched;
    } else if (current == noted || current == &unlogged_delete) {
      // (a block an earlier session's full log dropped is in this baseline: its mark goes)
      b.nbytes[data.get()] = nbytes;   // listed first: an insert that throws swaps nothing
      if (data.compare_exchange_deleter(current, &baseline_delete)) {
        ++watched;
      } else {
        b.nbytes.erase(data.get());
      }
    }
  }
  return watched;
}

// Installs the wrapper around the current CPU allocator once. Never destroyed: blocks made
// while tracking may be freed at any time, during interpreter exit included.
void watch_cpu_frees() {
  static FreeWatchingAllocator* installed = nullptr;
  c10::Allocator* current = c10::GetCPUAllocator();
  if (installed != nullptr && current == installed) return;
  if (installed != nullptr && current == installed->base()) {
    c10::SetCPUAllocator(installed, /*priority=*/0);
    return;
  }
  // the base's deleter, noted before the wrapper can be asked for it (raw_deleter)
  c10::DeleterFnPtr noted = nullptr;
  c10::DeleterFnPtr plain = current->raw_deleter();
  if (plain != nullptr) g_base.deleter.compare_exchange_strong(noted, plain);
  auto* wrapper = new FreeWatchingAllocator(current);
  c10::SetCPUAllocator(wrapper, /*priority=*/0);
  if (c10::GetCPUAllocator() == wrapper) installed = wrapper;  // else: a higher-priority one
}

// Whether this session's blocks bypass the base allocator (see g_base): only where the wrapper
// stands in front of PyTorch's default one.
void choose_cpu_path() {
  auto* wrapper = dynamic_cast<FreeWatchingAllocator*>(c10::GetCPUAllocator());
  g_base.direct.store(wrapper != nullptr && FreeWatchingAllocator::may_bypass(wrapper->base()),
                      std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------------
// Op context.
// A forward op inside backward while a module runs: a reentrant checkpoint's recompute,
// whose nodes the nested backward then runs (without their sequence numbers half of its
// memory had no module). On the thread that tracks only: sequence numbers count per thread
// and are looked up by number, so a recompute on CUDA's autograd device thread would take
// numbers the training thread's forward already gave (its memory stays "outside modules").
inline bool recompute_on_owner(const Session& s, const ThreadState& ts) {
  return !ts.modules.empty() &&
         std::this_thread::get_id() == s.owner.load(std::memory_order_relaxed);
}

std::unique_ptr<at::ObserverContext> on_op_start(const at::RecordFunction& fn) {
  if (!recording()) return nullptr;
  Session& s = session();
  ThreadState& ts = thread_state();
  const char* raw_name = fn.name();
  int64_t seq = fn.seqNr();
  const NameRef ref = raw_name != nullptr ? name_of(ts, raw_name, &fn) : NameRef{-1, false};
  // A node of backward is the engine's "autograd::engine::evaluate_function: <Node>" frame;
  // the engine names its node the evaluating one (autograd's NodeGuard) before the frame
  // begins, and the node's sequence number is read there. The node's own frame inside it
  // (scope BACKWARD_FUNCTION) is not subscribed to: it told only that number, and each one
  // cost a RecordFunction and two demangled copies of the node's name. The node's saved
  // tensors are released inside the evaluate frame, after the node's own frame ended. (Paths
  // that run a node without that frame - torch.distributed.autograd's engine, a grad_fn
  // called from Python - are not seen as backward: the node's own frame told that before.)
  const bool backward = ref.evaluate;
  if (backward && seq < 0) {
    // (a shared_ptr in older torch, an intrusive_ptr in newer)
    auto node = torch::autograd::get_current_node();
    if (node) seq = static_cast<int64_t>(node->sequence_nr());
  }
  const int32_t name = ref.id;
  ts.ops.push_back(OpFrame{name, seq, backward});
  if (backward) {
    ++ts.backward_depth;
    // The first node of a backward pass: a marker, so phase times can be read off the stream.
    if (s.phase.load(std::memory_order_relaxed) != kPhaseBackward &&
        s.phase.exchange(kPhaseBackward, std::memory_order_relaxed) != kPhaseBackward) {
      record(ts, kKindMark, 0, 0, 0, 0, c10::Device(c10::DeviceType::CPU), s.backward_label);
    }
  } else if (seq >= 0 && (ts.backward_depth == 0 || recompute_on_owner(s, ts)) &&
             ts.buf->seq_quota.admit(s.seqs_reserved, s.side_capacity)) {
    ts.buf->seqs.append(
        SeqRecord{seq, name, ts.modules.empty() ? -1 : ts.modules.back(), ts.index});
  }
  return nullptr;
}

void on_op_end(const at::RecordFunction& fn, at::ObserverContext*) {
  ThreadState& ts = tls();
  if (ts.generation != session().generation.load(std::memory_order_relaxed)) return;
  if (ts.ops.empty()) return;
  if (ts.ops.back().backward) --ts.backward_depth;
  ts.ops.pop_back();
}

// ---------------------------------------------------------------------------------------------
// Python-facing controls.
uint64_t start(int64_t capacity, bool hooks_only) {
  Session& s = session();
  if (s.active.load()) {
    throw std::runtime_error("memprof tracking is already active in this process");
  }
  pop_stale_reporter();
  if (c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE) != nullptr) {
    throw std::runtime_error(
        "another profiler (torch.profiler or autograd.profiler) is active on this thread: "
        "PyTorch reports allocations to one profiler at a time; stop it before memprof.track");
  }
  if (capacity <= 0) throw std::invalid_argument("capacity must be a positive number of events");
  {
    std::lock_guard<std::mutex> lock(s.registry_mu);
    s.buffers.clear();
  }
  s.strings.clear();
  s.backward_label = s.strings.intern("backward_start");
  s.events_reserved = 0;
  s.dropped_any = false;
  forget_unlogged_cuda_blocks();   // an earlier session's
  forget_reported_cpu_blocks();    // likewise
  s.external_total = 0;
  s.capacity = capacity;
  s.marks = 0;
  s.marks_dropped = 0;
  s.seqs_reserved = 0;
  s.side_capacity = std::max<int64_t>(capacity, kMinSideCap);
  s.phase = kPhaseOther;
  s.phase_thread = nullptr;
  s.step = 0;
  s.step_end_total = -1;
  s.steps_growing = 0;
  s.hooks_only = hooks_only;
  start_chunk_pool();
  uint64_t gen = s.generation.fetch_add(1) + 1;
  s.owner.store(std::this_thread::get_id(), std::memory_order_relaxed);
  s.reporter = std::make_shared<Reporter>(gen);
  c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, s.reporter);
  // The CPU allocator logs a warning for every free of a block allocated before profiling
  // started (the normal case here: parameters, inputs); memprof accounts for those itself.
  s.saved_log_level = FLAGS_caffe2_log_level;
  FLAGS_caffe2_log_level = std::max<int>(FLAGS_caffe2_log_level, 2 /* ERROR */);
  watch_cpu_frees();
  choose_cpu_path();
  count_op_deregistrations();
  s.active.store(true, std::memory_order_release);
  if (!s.callback_installed) {
    s.callback = at::addGlobalCallback(
        at::RecordFunctionCallback(&on_op_start, &on_op_end)
            .needsInputs(false)
            .scopes({at::RecordScope::FUNCTION}));
    s.callback_installed = true;
  }
  return gen;
}

// Pushes the reporter onto the calling thread (a thread started while tracking, e.g. a
// DataLoader or pin-memory thread, or one that existed before and now runs an op); it goes
// inert by itself when the session ends.
bool attach_thread() {
  Session& s = session();
  if (!s.active.load()) return false;
  if (std::this_thread::get_id() == s.owner.load(std::memory_order_relaxed)) return false;
  pop_stale_reporter();
  if (c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE) != nullptr) return false;
  c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE,
                                   std::make_shared<Reporter>(s.generation.load()));
  return true;
}

// Returns a warning message ("" when none). Idempotent.
std::string stop() {
  Session& s = session();
  if (!s.active.load()) return "";
  std::string warning;
  s.active.store(false, std::memory_order_release);
  FLAGS_caffe2_log_level = s.saved_log_level;
  if (s.callback_installed) {
    at::removeCallback(s.callback);
    s.callback_installed = false;
  }
  if (std::this_thread::get_id() != s.owner.load(std::memory_order_relaxed)) {
    warning = "memprof.track was stopped on another thread than it started on; its allocation "
              "hook stays inert on the starting thread";
  } else if (c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE) ==
             s.reporter.get()) {
    c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
  } else {
    warning = "another profiler (e.g. torch.profiler) was started inside memprof.track and is "
              "still active: memprof missed the CUDA allocations made while it ran";
  }
  s.reporter.reset();
  stop_chunk_pool();   // writers still finishing an allocation map their own chunks
  return warning;
}

bool is_active() { return session().active.load(); }

// ---------------------------------------------------------------------------------------------
// fork(). A child (a DataLoader worker, multiprocessing's fork start method) inherits the
// session: it went on recording into its copy of the log, which nobody reads (a worker's
// memory grew ~75 bytes per allocation for its whole life). fork's child handler only stops
// it (an atomic store: nothing else is safe before the child runs); memprof's Python at-fork
// handler then calls release_after_fork, which takes the hooks off the child.
std::atomic<bool> g_forked_while_active{false};

void stop_in_forked_child() {
  Session& s = session();
  g_forked_while_active.store(s.active.load(std::memory_order_relaxed),
                              std::memory_order_relaxed);
  s.active.store(false, std::memory_order_relaxed);
}

// In a forked child: the op callback and the allocation hook off, the log's copy dropped, so
// the child runs at its own speed and can start a session of its own. The locks a parent's
// thread may have held at the fork are made anew (the child has one thread).
void release_after_fork() {
  if (!g_forked_while_active.exchange(false)) return;
  Session& s = session();
  new (&s.registry_mu) std::mutex();
  s.buffers.clear();
  new (&s.strings) StringTable();   // the old table is abandoned with its lock
  if (s.callback_installed) {
    at::removeCallback(s.callback);
    s.callback_installed = false;
  }
  pop_stale_reporter();   // not live any more: the forking thread's hook comes off
  s.reporter.reset();
  s.generation.fetch_add(1);
  FLAGS_caffe2_log_level = s.saved_log_level;
}

void push_module(int32_t id) {
  if (!recording()) return;
  thread_state().modules.push_back(id);
}

void pop_module() {
  if (!recording()) return;
  ThreadState& ts = thread_state();
  if (!ts.modules.empty()) ts.modules.pop_back();
}

void set_phase(int32_t phase) {
  if (phase < 0 || phase >= kNumPhases) {
    throw std::invalid_argument("phase must be one of memprof._C.PHASE_*, got " +
                                std::to_string(phase));
  }
  session().phase.store(phase, std::memory_order_relaxed);
  session().phase_thread.store(&tls(), std::memory_order_relaxed);
}
int32_t get_phase() { return session().phase.load(std::memory_order_relaxed); }
void set_step(int32_t step) { session().step.store(step, std::memory_order_relaxed); }

// A zero-size marker in the event stream, ordered with the allocations around it
// (step boundaries, snapshots taken by the Python side).
// The label is read in place (a str's cached UTF-8) and interned through the thread's name
// cache, like op names: markers come several per step from Python hooks, and a conversion to
// std::string plus the global table's lock and hash each time showed in the step's cost.
void mark(const py::str& label, uint64_t value) {
  if (!recording()) return;
  const char* text = PyUnicode_AsUTF8(label.ptr());   // owned by the str
  if (text == nullptr) throw py::error_already_set();
  ThreadState& ts = thread_state();
  record(ts, kKindMark, value, 0, 0, 0, c10::Device(c10::DeviceType::CPU),
         intern_cached(ts, text));
}

// The per-pass and per-step transitions, each one call from Python instead of two to four:
// they run once per pass or step, right after the step's kernels have evicted memprof's code
// and data, where each call into the module cost ~2 us (the benchmark MLP's 10 ms step).
// A marker whose label is a literal: interned through its (static) address.
void mark_static(const char* label, uint64_t value) {
  if (!recording()) return;
  ThreadState& ts = thread_state();
  record(ts, kKindMark, value, 0, 0, 0, c10::Device(c10::DeviceType::CPU),
         intern_cached(ts, label, /*literal=*/true));
}

// A real forward pass of the model begins: its phase, its marker, its module.
void forward_start(uint64_t step, int32_t module_id) {
  set_phase(kPhaseForward);
  mark_static("forward_start", step);
  push_module(module_id);
}

// ... and ends: its module off the stack; the phase back to "other" with its marker unless
// something inside moved it on (a backward inside the pass).
void forward_end(uint64_t step) {
  pop_module();
  if (get_phase() == kPhaseForward) {
    set_phase(kPhaseOther);
    mark_static("forward_end", step);
  }
}

// A torch.autograd.backward call returned: the backward phase ends (what runs next, logging or
// the next micro-step's data, is not backward) and its marker (backward time, phase ends).
void backward_end(uint64_t step) {
  if (get_phase() == kPhaseBackward) set_phase(kPhaseOther);
  mark_static("backward_end", step);
}

// The watched optimizer's update begins.
void optimizer_start(uint64_t step) {
  mark_static("optimizer_start", step);
  set_phase(kPhaseOptimizer);
}

// A step boundary: the marker of the step that ended, the next step's number; returns the
// autograd sequence number the next node will get (where the next step's graph begins).
// `phase`: set first when not negative (the optimizer's update is over).
int64_t step_end(uint64_t ended, int32_t phase) {
  if (phase >= 0) set_phase(phase);
  mark_static("step", ended);
  set_step(static_cast<int32_t>(ended + 1));
  if (recording()) {
    // process-wide counts: CUDA's as this (the training) thread last saw it reported, once
    // it reported; else the CPU blocks recorded and not freed
    Session& s = session();
    const ThreadState& ts = thread_state();
    int64_t total = ts.cuda_total > 0 ? ts.cuda_total : cpu_block_bytes();
    s.steps_growing =
        s.step_end_total >= 0 && total > s.step_end_total ? s.steps_growing + 1 : 0;
    s.step_end_total = total;
  }
  return static_cast<int64_t>(at::sequence_number::peek());
}

int32_t steps_growing() { return session().steps_growing; }

// The session's thread buffers, copied under the registry lock.
std::vector<std::shared_ptr<ThreadBuffer>> all_buffers() {
  Session& s = session();
  std::lock_guard<std::mutex> lock(s.registry_mu);
  return s.buffers;
}

// Copies one log of every thread (events or seq records) into one byte array; the caller views
// it with the record's dtype (memprof.record.events). Each log contributes the records it had
// published when its count was read (not yet taken ones), from `since[i]` on for the thread of
// index i when given: a reader that follows the log while it grows (the callbacks' live peak)
// copies only what is new, not the whole log each time.
template <typename Log>
py::array_t<uint8_t> drain(Log ThreadBuffer::*log, const std::vector<int64_t>& since = {}) {
  auto buffers = all_buffers();
  std::vector<size_t> from, counts;
  from.reserve(buffers.size());
  counts.reserve(buffers.size());
  size_t total = 0;
  for (size_t i = 0; i < buffers.size(); ++i) {
    Log& l = (*buffers[i]).*log;
    counts.push_back(l.count.load(std::memory_order_acquire));
    size_t start = l.taken;
    if (i < since.size() && since[i] > 0) start = std::max(start, static_cast<size_t>(since[i]));
    from.push_back(std::min(start, counts.back()));
    total += counts.back() - from.back();
  }
  using Record = typename Log::value_type;
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(total * sizeof(Record)));
  auto* dst = reinterpret_cast<Record*>(out.mutable_data());
  for (size_t i = 0; i < buffers.size(); ++i) {
    Log& l = (*buffers[i]).*log;
    l.visit(from[i], counts[i], [&](const Record* src, size_t n) {
      std::memcpy(dst, src, n * sizeof(Record));
      dst += n;
    });
  }
  return out;
}

// The event log of a stopped session, split while it is merged: the memory events of the
// analysed device (CUDA when any CUDA memory was recorded, else the CPU) in one array, every
// other record (markers, OOM reports, other devices' memory events) in a second, with the
// number of memory events before each of those. The Profile reads the first in place, so
// leaving a block never holds the events twice. `prefix_devices`: one device type per block
// that existed before tracking; each gets a zeroed record in front of its array (in the given
// order) for the caller to fill. Each thread's log is already in time order, so this is a k-way
// merge (ties: lower thread index first, as a stable sort of the concatenated logs would give),
// not a sort; every chunk is freed once copied (but each thread's last one, see RecordLog), so
// nothing but those last chunks stays allocated natively after it.
py::tuple take_events(const std::vector<int>& prefix_devices) {
  Session& s = session();
  if (s.active.load()) throw std::runtime_error("take_events: the session is still recording");
  using Log = decltype(ThreadBuffer::events);
  struct Head {
    Log* log;
    typename Log::Chunk* chunk;
    size_t at, end;  // record index (in the log) of the next record, one past the last to take
    const Event& peek() const { return chunk->records[at % Log::kChunkRecords]; }
  };
  std::vector<Head> heads;
  auto buffers = all_buffers();
  for (auto& b : buffers) {
    Log& l = b->events;
    size_t end = l.count.load(std::memory_order_acquire);
    if (end <= l.taken) continue;
    // walk to the chunk holding the first record not yet taken
    auto* c = l.head.load(std::memory_order_acquire);
    for (size_t first = l.head_first; first + Log::kChunkRecords <= l.taken;
         first += Log::kChunkRecords) {
      c = c->next.load(std::memory_order_acquire);
    }
    heads.push_back(Head{&l, c, l.taken, end});
  }
  // One counting pass: which device is analysed, and how many records go to each array.
  const int8_t cuda = static_cast<int8_t>(c10::DeviceType::CUDA);
  size_t total = prefix_devices.size(), memory_cpu = 0, memory_cuda = 0;
  for (Head& h : heads) {
    total += h.end - h.at;
    h.log->visit(h.at, h.end, [&](const Event* e, size_t n) {
      for (size_t i = 0; i < n; ++i) {
        if (e[i].kind != kKindMemory) continue;
        if (e[i].device_type == cuda) {
          ++memory_cuda;
        } else if (e[i].device_type == static_cast<int8_t>(c10::DeviceType::CPU)) {
          ++memory_cpu;
        }
      }
    });
  }
  for (int d : prefix_devices) {
    if (d == cuda) {
      ++memory_cuda;
    } else if (d == static_cast<int>(c10::DeviceType::CPU)) {
      ++memory_cpu;
    }
  }
  const int8_t device = memory_cuda ? cuda : static_cast<int8_t>(c10::DeviceType::CPU);
  const size_t n_memory = memory_cuda ? memory_cuda : memory_cpu;
  py::array_t<uint8_t> memory(static_cast<py::ssize_t>(n_memory * sizeof(Event)));
  py::array_t<uint8_t> side(static_cast<py::ssize_t>((total - n_memory) * sizeof(Event)));
  py::array_t<int64_t> side_position(static_cast<py::ssize_t>(total - n_memory));
  auto* mem_dst = reinterpret_cast<Event*>(memory.mutable_data());
  auto* side_dst = reinterpret_cast<Event*>(side.mutable_data());
  int64_t* pos_dst = side_position.mutable_data();
  int64_t placed = 0;  // memory events written so far
  for (int d : prefix_devices) {
    if (d == device) {
      std::memset(mem_dst++, 0, sizeof(Event));
      ++placed;
    } else {
      std::memset(side_dst++, 0, sizeof(Event));
      *pos_dst++ = placed;
    }
  }
  auto emit = [&](const Event& e) {
    if (e.kind == kKindMemory && e.device_type == device) {
      *mem_dst++ = e;
      ++placed;
    } else {
      *side_dst++ = e;
      *pos_dst++ = placed;
    }
  };
  // Frees the chunks a head has moved past, as the merge goes (one chunk at a time).
  auto finish_chunk = [](Head& h) {
    h.log->taken = h.at;
    h.log->release_before(h.at);
  };
  if (heads.size() == 1) {  // one thread: chunk by chunk
    Head& h = heads[0];
    h.log->visit(h.at, h.end, [&](const Event* e, size_t n) {
      for (size_t i = 0; i < n; ++i) emit(e[i]);
      h.at += n;
      finish_chunk(h);
    });
  } else {  // heads.size() is the number of recording threads: a linear scan is cheapest
    while (true) {
      int best = -1;
      for (int i = 0; i < static_cast<int>(heads.size()); ++i) {
        if (heads[i].at < heads[i].end &&
            (best < 0 || heads[i].peek().t_ns < heads[best].peek().t_ns)) {
          best = i;
        }
      }
      if (best < 0) break;
      Head& h = heads[best];
      emit(h.peek());
      if (++h.at % Log::kChunkRecords == 0 && h.at < h.end) {
        h.chunk = h.chunk->next.load(std::memory_order_acquire);
        finish_chunk(h);
      }
    }
    for (Head& h : heads) finish_chunk(h);
  }
  return py::make_tuple(memory, side, side_position, static_cast<int>(device));
}

// An allocation (size > 0) or free (size < 0) that no allocator reported: storages of fake
// tensors when memprof estimates a step without running it. Stamped with the same op, module,
// phase and step context as real events, so an estimated step is a Profile like a measured one.
void record_external(uint64_t ptr, int64_t size, int32_t device_type, int32_t device_index) {
  Session& s = session();
  if (!recording()) return;
  int64_t total = s.external_total.fetch_add(size, std::memory_order_relaxed) + size;
  record(thread_state(), kKindMemory, ptr, size, total, 0,
         c10::Device(static_cast<c10::DeviceType>(device_type),
                     static_cast<c10::DeviceIndex>(device_index)));
}

// True once the event log can take no more memory events from this thread: its quota is
// spent and the session's capacity is all handed out. What memprof notes per step from then
// on (category snapshots) could not be matched to any allocation, and would only grow.
bool log_full() {
  if (!recording()) return false;
  Session& s = session();
  ThreadState& ts = thread_state();
  return ts.buffer->event_quota.left == 0 &&
         s.events_reserved.load(std::memory_order_relaxed) >= s.capacity;
}

py::dict counters() {
  Session& s = session();
  py::dict d;
  int64_t records = 0, dropped = 0, seqs_dropped = 0;
  auto buffers = all_buffers();
  for (auto& b : buffers) {
    records += static_cast<int64_t>(b->events.count.load(std::memory_order_acquire));
    dropped += b->event_quota.dropped.load(std::memory_order_relaxed);
    seqs_dropped += b->seq_quota.dropped.load(std::memory_order_relaxed);
  }
  d["records"] = records;  // events, markers and OOM reports logged, taken or not
  d["dropped"] = dropped;
  d["capacity"] = s.capacity;
  d["markers_dropped"] = s.marks_dropped.load();
  d["seq_records_dropped"] = seqs_dropped;
  d["threads"] = buffers.size();
  // the log's huge chunks this session: faulted in ahead by chunk_pool's worker, or mapped by
  // the writer itself (none was ready)
  ChunkPoolCounts chunks = chunk_pool_counts();
  d["chunks_ready"] = chunks.ready;
  d["chunks_mapped"] = chunks.mapped;
  return d;
}


// ---------------------------------------------------------------------------------------------
// The per-step entry points as plain CPython functions (positional arguments only). pybind11's
// dispatcher (a function_call record, argument casters, the overload walk, the exception
// translators) cost ~1,100 instructions per call in callgrind, and a training step calls these
// ~27 times (a module push and pop per submodule call, the pass, backward and optimizer
// markers), right after its kernels have evicted memprof's code; a METH_O / METH_FASTCALL
// function is a direct call.
bool to_u64(PyObject* o, uint64_t* out) {
  PyObject* index = PyLong_CheckExact(o) ? (Py_INCREF(o), o) : PyNumber_Index(o);
  if (index == nullptr) return false;
  *out = PyLong_AsUnsignedLongLong(index);
  Py_DECREF(index);
  return !(*out == static_cast<uint64_t>(-1) && PyErr_Occurred());
}

bool to_i32(PyObject* o, int32_t* out) {
  long v = PyLong_AsLong(o);   // (takes __index__)
  if (v == -1 && PyErr_Occurred()) return false;
  if (v < INT32_MIN || v > INT32_MAX) {
    PyErr_SetString(PyExc_OverflowError, "value out of the range of a 32-bit int");
    return false;
  }
  *out = static_cast<int32_t>(v);
  return true;
}

// Calls fn(): false with the Python error set when it threw - a native exception said as
// Python's, a Python one as it was (as pybind11 does).
template <typename Fn>
bool native_ok(Fn&& fn) {
  try {
    fn();
    return true;
  } catch (py::error_already_set& e) {   // a Python error (mark's label not UTF-8): its own
    e.restore();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return false;
}

// native_ok(fn), answered None.
template <typename Fn>
PyObject* none_after(Fn&& fn) {
  if (!native_ok(fn)) return nullptr;
  Py_RETURN_NONE;
}

bool arg_count(const char* name, Py_ssize_t n, Py_ssize_t lo, Py_ssize_t hi) {
  if (n >= lo && n <= hi) return true;
  PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd positional arguments (%zd given)", name,
               lo, hi, n);
  return false;
}

PyObject* fast_push_module(PyObject*, PyObject* arg) {
  int32_t id;
  if (!to_i32(arg, &id)) return nullptr;
  return none_after([&] { push_module(id); });
}

PyObject* fast_pop_module(PyObject*, PyObject*) {
  return none_after([] { pop_module(); });
}

PyObject* fast_set_phase(PyObject*, PyObject* arg) {
  int32_t phase;
  if (!to_i32(arg, &phase)) return nullptr;
  return none_after([&] { set_phase(phase); });
}

PyObject* fast_mark(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("mark", n, 1, 2)) return nullptr;
  if (!PyUnicode_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "mark(): label must be a str");
    return nullptr;
  }
  uint64_t value = 0;
  if (n == 2 && !to_u64(args[1], &value)) return nullptr;
  const py::str label = py::reinterpret_borrow<py::str>(args[0]);
  return none_after([&] { mark(label, value); });
}

PyObject* fast_forward_start(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("forward_start", n, 2, 2)) return nullptr;
  uint64_t step;
  int32_t module_id;
  if (!to_u64(args[0], &step) || !to_i32(args[1], &module_id)) return nullptr;
  return none_after([&] { forward_start(step, module_id); });
}

template <void (*Fn)(uint64_t)>
PyObject* fast_step_call(PyObject*, PyObject* arg) {
  uint64_t step;
  if (!to_u64(arg, &step)) return nullptr;
  return none_after([&] { Fn(step); });
}

PyObject* fast_step_end(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("step_end", n, 1, 2)) return nullptr;
  uint64_t ended;
  int32_t phase = -1;
  if (!to_u64(args[0], &ended) || (n == 2 && !to_i32(args[1], &phase))) return nullptr;
  int64_t seq = 0;
  if (!native_ok([&] { seq = step_end(ended, phase); })) return nullptr;
  return PyLong_FromLongLong(seq);
}

PyObject* fast_steps_growing(PyObject*, PyObject*) { return PyLong_FromLong(steps_growing()); }

PyObject* fast_log_full(PyObject*, PyObject*) {
  bool full = false;   // (the thread's first call makes its state)
  if (!native_ok([&] { full = log_full(); })) return nullptr;
  return PyBool_FromLong(full);
}

// (static: CPython keeps pointers to the definitions for the functions' lifetime)
PyMethodDef kStepCalls[] = {
    {"push_module", fast_push_module, METH_O, "push_module(module_id, /)\n--\n\n"
     "The module a scoped call runs in, on this thread (until pop_module)."},
    {"pop_module", fast_pop_module, METH_NOARGS, "pop_module($module, /)\n--\n\n"
     "The module pushed last leaves."},
    {"set_phase", fast_set_phase, METH_O, "set_phase(phase, /)\n--\n\nThe training phase."},
    {"mark", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(fast_mark)), METH_FASTCALL,
     "mark(label, value=0, /)\n--\n\nA marker event in the stream."},
    {"forward_start", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(fast_forward_start)),
     METH_FASTCALL, "forward_start(step, module_id, /)\n--\n\n"
     "set_phase(PHASE_FORWARD), mark('forward_start', step), push_module(module_id)."},
    {"forward_end", fast_step_call<forward_end>, METH_O, "forward_end(step, /)\n--\n\n"
     "pop_module(); if still PHASE_FORWARD: PHASE_OTHER and mark('forward_end', step)."},
    {"backward_end", fast_step_call<backward_end>, METH_O, "backward_end(step, /)\n--\n\n"
     "PHASE_OTHER if the phase is PHASE_BACKWARD, mark('backward_end', step)."},
    {"optimizer_start", fast_step_call<optimizer_start>, METH_O, "optimizer_start(step, /)\n--\n\n"
     "mark('optimizer_start', step), set_phase(PHASE_OPTIMIZER)."},
    {"step_end", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(fast_step_end)),
     METH_FASTCALL, "step_end(ended, phase=-1, /)\n--\n\n"
     "set_phase(phase) if phase >= 0, mark('step', ended), set_step(ended + 1); returns "
     "peek_sequence_nr()."},
    {"steps_growing", fast_steps_growing, METH_NOARGS, "steps_growing($module, /)\n--\n\n"
     "Step ends in a row, up to the last, with more allocated than at the one before."},
    {"log_full", fast_log_full, METH_NOARGS, "log_full($module, /)\n--\n\n"
     "Whether the event log is full for the calling thread (its next memory event is "
     "dropped); False when not recording."},
    {nullptr, nullptr, 0, nullptr}};

void add_step_calls(py::module_& m) {
  for (PyMethodDef* def = kStepCalls; def->ml_name != nullptr; ++def) {
    PyObject* fn = PyCFunction_NewEx(def, m.ptr(), m.attr("__name__").ptr());
    if (fn == nullptr) throw py::error_already_set();
    m.attr(def->ml_name) = py::reinterpret_steal<py::object>(fn);
  }
}

}  // namespace

bool allocated_past_the_log(void (*deleter)(void*)) { return deleter == &unlogged_delete; }

bool cuda_block_past_the_log(uint64_t ptr) {
  UnloggedCudaBlocks& b = unlogged_cuda_blocks();
  if (!b.any.load(std::memory_order_acquire)) return false;
  std::lock_guard<std::mutex> lock(b.mutex);
  return b.live.count(ptr) != 0;
}

uint64_t recording_session() {
  return recording() ? session().generation.load(std::memory_order_acquire) : 0;
}

void register_tracker(py::module_& m) {
  // a failure (ENOMEM) leaves forked children recording, as before this handler existed
  static const int atfork_status = pthread_atfork(nullptr, nullptr, &stop_in_forked_child);
  (void)atfork_status;
  baseline_blocks();   // made before the handlers below can run
  static const int baseline_atfork_status = pthread_atfork(
      &lock_baseline_blocks_for_fork, &unlock_baseline_blocks_after_fork,
      &unlock_baseline_blocks_after_fork);
  (void)baseline_atfork_status;
  static const int cpu_blocks_atfork_status = pthread_atfork(
      &lock_cpu_blocks_for_fork, &unlock_cpu_blocks_after_fork, &unlock_cpu_blocks_after_fork);
  (void)cpu_blocks_atfork_status;
  static const int cuda_atfork_status = pthread_atfork(
      &lock_unlogged_cuda_blocks_for_fork, &unlock_unlogged_cuda_blocks_after_fork,
      &unlock_unlogged_cuda_blocks_after_fork);
  (void)cuda_atfork_status;
  static const int chunk_pool_atfork_status = pthread_atfork(
      &lock_chunk_pool_for_fork, &unlock_chunk_pool_after_fork, &reset_chunk_pool_in_child);
  (void)chunk_pool_atfork_status;
  // one function for both would read every tracked block as dropped (see unlogged_delete)
  // (read through volatile: the compiler would fold the comparison of two functions to false)
  c10::DeleterFnPtr volatile dropped_one = &unlogged_delete;
  c10::DeleterFnPtr volatile watched_one = &watched_delete;
  if (dropped_one == watched_one) {
    throw std::runtime_error("memprof._C was linked with identical code folded: "
                             "unlogged_delete and watched_delete must stay two functions");
  }
  m.def("release_after_fork", &release_after_fork,
        "In a child forked while recording: take the hooks off and drop the log's copy.");
  m.def("start", &start, py::arg("capacity"), py::arg("hooks_only") = false,
        "Start recording allocations and ops on this thread (and autograd threads it spawns). "
        "hooks_only: install the same hooks with empty bodies and record nothing (what "
        "PyTorch's hook points cost by themselves; benchmarks only).");
  m.def("watch_baseline_frees", &watch_baseline_frees, py::arg("tensors"),
        "Report the frees of these CPU tensors' blocks (made before the session, so the CPU "
        "allocator would free them without a report). Returns how many blocks are watched.");
  m.def("stop", &stop, "Stop recording; idempotent. Returns a warning string or ''.");
  m.def("is_active", &is_active);
  m.def("attach_thread", &attach_thread,
        "Record allocations of the calling thread too (threads started while tracking).");
  m.def("get_phase", &get_phase);
  m.def("set_step", &set_step, py::arg("step"));
  add_step_calls(m);   // push_module, pop_module, set_phase, mark, ... (see kStepCalls)
  m.def("events",
        [](const std::vector<int64_t>& since) { return drain(&ThreadBuffer::events, since); },
        py::arg("since") = std::vector<int64_t>{},
        "Events recorded so far, as raw bytes (view with EVENT_DTYPE), thread by thread in "
        "registration order; since[i]: skip the first since[i] records of thread i.");
  m.def("take_events", &take_events, py::arg("prefix_devices"),
        "The stopped session's events, freeing the native log: (memory events of the analysed "
        "device, every other record, memory events before each of those, the device type); "
        "both in time order after one zeroed record per entry of prefix_devices (view the "
        "bytes with EVENT_DTYPE).");
  m.def("seq_records", []() { return drain(&ThreadBuffer::seqs); },
        "Forward ops by autograd sequence number, as raw bytes (view with SEQ_DTYPE).");
  m.def("strings", []() { return session().strings.all(); });
  m.def("record_external", &record_external, py::arg("ptr"), py::arg("size"),
        py::arg("device_type") = 0, py::arg("device_index") = 0,
        "Record an allocation/free no allocator reported (fake tensors of an estimate).");
  m.def("peek_sequence_nr", []() { return at::sequence_number::peek(); },
        "The autograd sequence number the next node created on this thread will get.");
  m.def("counters", &counters);
}

}  // namespace memprof

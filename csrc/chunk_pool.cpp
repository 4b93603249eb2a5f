// The event log's chunk memory and the worker that faults it in ahead (see chunk_pool.h).
#include "chunk_pool.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace memprof {

// mmap gives no alignment: a huge chunk maps one huge page more and cuts the ends off.
void* map_chunk(size_t bytes, bool huge) {
  size_t length = mapped_length(bytes);
  if (!huge || length < kHugePage) {
    void* p = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return p;
  }
  size_t span = length + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  auto start = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
  if (aligned > start) munmap(raw, aligned - start);
  size_t tail = start + span - (aligned + length);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + length), tail);
#ifdef MADV_HUGEPAGE
  (void)madvise(reinterpret_cast<void*>(aligned), length, MADV_HUGEPAGE);  // a hint: may say no
#endif
  return reinterpret_cast<void*>(aligned);
}

void unmap_chunk(void* p, size_t bytes) { munmap(p, mapped_length(bytes)); }

namespace {

// Chunks kept ready: one is enough while the worker keeps pace, the second covers a chunk
// that fills while the next is still being faulted in (a cold host: milliseconds).
constexpr size_t kReadyChunks = 2;

// Every page of a fresh chunk written once: the kernel allocates and zeroes it now, on this
// thread. With a huge page the first store faults all of it and the rest are plain stores;
// where the kernel gave small pages, each store faults its own.
void fault_in(void* chunk) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  volatile char* bytes = static_cast<volatile char*>(chunk);
  for (size_t off = 0; off < kHugePage; off += page) bytes[off] = 0;
}

struct ChunkPool {
  std::mutex mu;
  std::condition_variable wake;
  std::vector<void*> ready;      // faulted-in chunks, under mu
  std::thread worker;
  bool running = false;          // a worker was started this session (under mu)
  bool stopping = false;         // the session stopped: the worker returns (under mu)
  bool failed = false;           // the worker could not start or map: writers map their own
  std::atomic<int64_t> taken_ready{0}, mapped_here{0};

  void run() {
    std::unique_lock<std::mutex> lock(mu);
    while (!stopping) {
      if (ready.size() >= kReadyChunks) {
        wake.wait(lock);
        continue;
      }
      lock.unlock();
      void* chunk = nullptr;
      try {
        chunk = map_chunk(kHugePage, /*huge=*/true);
        fault_in(chunk);
      } catch (const std::bad_alloc&) {
        lock.lock();
        failed = true;   // the writers' own mapping says so where it matters (it throws)
        return;
      }
      lock.lock();
      ready.push_back(chunk);
    }
  }

  void* take() {
    void* chunk = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!ready.empty()) {
        chunk = ready.back();
        ready.pop_back();
      }
      // from a session's second chunk on: a block that fills one chunk (a short block, a
      // test) pays no thread and no pages it would not use (scratch: +5-10 ns per event over
      // blocks of 20,000 events when the worker started with the first)
      if (!running && !failed && !stopping &&
          taken_ready.load(std::memory_order_relaxed) +
                  mapped_here.load(std::memory_order_relaxed) >= 1) {
        start_worker();
      }
    }
    wake.notify_one();
    if (chunk != nullptr) {
      taken_ready.fetch_add(1, std::memory_order_relaxed);
      return chunk;
    }
    mapped_here.fetch_add(1, std::memory_order_relaxed);
    return map_chunk(kHugePage, /*huge=*/true);
  }

  // Under mu. The worker blocks every signal (it inherits the mask it is created with): a
  // Ctrl-C or SIGTERM goes to the threads that run Python, as without it.
  void start_worker() {
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    try {
      worker = std::thread([this] { run(); });
      running = true;
    } catch (...) {    // no thread to be had (system_error, bad_alloc): every chunk is
      failed = true;   // mapped by its writer; nothing thrown into the allocation hook
    }
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);   // the writer's own mask, always
  }

  void start() {
    std::lock_guard<std::mutex> lock(mu);
    stopping = false;
    failed = false;
    taken_ready = 0;
    mapped_here = 0;
  }

  void stop() {
    std::thread joining;
    std::vector<void*> unused;
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;   // a late writer's take after this maps its own, starts no worker
      joining = std::move(worker);
      running = false;
    }
    wake.notify_one();
    if (joining.joinable()) joining.join();
    {
      std::lock_guard<std::mutex> lock(mu);
      unused.swap(ready);
    }
    for (void* chunk : unused) unmap_chunk(chunk, kHugePage);
  }
};

// Never destroyed: a writer thread may take a chunk while the process exits.
ChunkPool* const g_pool = new ChunkPool();

}  // namespace

void* take_huge_chunk() { return g_pool->take(); }
void start_chunk_pool() { g_pool->start(); }
void stop_chunk_pool() { g_pool->stop(); }

ChunkPoolCounts chunk_pool_counts() {
  return {g_pool->taken_ready.load(std::memory_order_relaxed),
          g_pool->mapped_here.load(std::memory_order_relaxed)};
}

void lock_chunk_pool_for_fork() { g_pool->mu.lock(); }
void unlock_chunk_pool_after_fork() { g_pool->mu.unlock(); }

// The child has the parent's memory and one thread: the worker's std::thread is a handle to
// a thread that is not there (left as it is: joining or destroying it would fail), its ready
// chunks are copies nobody will take, and the lock, held through the fork, is made anew.
void reset_chunk_pool_in_child() {
  ChunkPool& p = *g_pool;
  for (void* chunk : p.ready) unmap_chunk(chunk, kHugePage);
  p.ready.clear();
  new (&p.worker) std::thread();
  p.running = false;
  p.stopping = true;   // until the child's own session starts the pool again
  new (&p.mu) std::mutex();
  new (&p.wake) std::condition_variable();
}

}  // namespace memprof

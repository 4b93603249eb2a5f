// Pairs each allocation of an event stream with the free that releases it, in one pass.
//
// Leaving a tracked block (and loading a profile) needs, for every event, its partner: the
// categories, the live-byte timeline and every "alive at" query read it. A block's address is
// unique while it is alive, so walking the stream in order with "address -> its allocation
// not yet freed" gives each free its allocation: O(n) with an open-addressing table sized to
// the blocks alive at once, instead of a stable sort of every address (the numpy way, which
// tests/record/test_pairs.py keeps as the reference this must equal). The same pass copies out
// the columns it reads anyway.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "live_blocks.h"

namespace py = pybind11;

namespace memprof {
namespace {

// One field of the event records (a structured array), read in place: base and byte stride.
struct Column {
  const uint8_t* data;
  ssize_t stride;
  template <typename T>
  T at(ssize_t i) const { return *reinterpret_cast<const T*>(data + i * stride); }
};

// What the pass writes: the pairing, and contiguous copies of the columns it reads anyway
// (size, phase, module), the signed size with frees of never-seen blocks as 0, and its
// running sum.
template <typename Index>
struct PassColumns {
  Index* free_of;
  Index* alloc_of;
  int64_t* size;
  int8_t* phase;
  int32_t* module;
  int64_t* effective_size;
  int64_t* live;
};

template <typename Index>
void pair_into(Column ptr, Column size, Column phase, Column module, ssize_t n,
               const PassColumns<Index>& out) {
  py::gil_scoped_release release;
  LiveBlocks live;
  int64_t live_bytes = 0;
  for (ssize_t i = 0; i < n; ++i) {
    out.free_of[i] = out.alloc_of[i] = -1;
  }
  for (ssize_t i = 0; i < n; ++i) {
    uint64_t addr = ptr.at<uint64_t>(i);
    int64_t bytes = size.at<int64_t>(i);
    int64_t effective = bytes;
    if (addr != 0 && bytes > 0) {
      live.put(addr, i);   // an unreleased earlier allocation at addr is forgotten
    } else if (bytes < 0) {
      int64_t at = addr != 0 ? live.take(addr) : -1;
      if (at >= 0) {
        out.free_of[at] = static_cast<Index>(i);
        out.alloc_of[i] = static_cast<Index>(at);
      } else {
        effective = 0;     // its allocation is not in the stream: no bytes to release
      }
    }
    live_bytes += effective;
    out.size[i] = bytes;
    out.phase[i] = phase.at<int8_t>(i);
    out.module[i] = module.at<int32_t>(i);
    out.effective_size[i] = effective;
    out.live[i] = live_bytes;
  }
}

template <typename Index>
py::tuple pair(Column ptr, Column size, Column phase, Column module, ssize_t n) {
  py::array_t<Index> free_of(n), alloc_of(n);
  py::array_t<int64_t> sizes(n), effective_size(n), live(n);
  py::array_t<int8_t> phases(n);
  py::array_t<int32_t> modules(n);
  pair_into<Index>(ptr, size, phase, module, n,
                   PassColumns<Index>{free_of.mutable_data(), alloc_of.mutable_data(),
                                      sizes.mutable_data(), phases.mutable_data(),
                                      modules.mutable_data(), effective_size.mutable_data(),
                                      live.mutable_data()});
  return py::make_tuple(free_of, alloc_of, sizes, phases, modules, effective_size, live);
}

Column checked_column(const py::array& col, ssize_t itemsize, const char* what,
                      const char* caller = "pair_allocations") {
  if (col.ndim() != 1 || col.itemsize() != itemsize || col.strides(0) % itemsize != 0) {
    throw py::value_error(std::string(caller) + ": expected a 1-D " +
                          std::to_string(itemsize) + "-byte " + what + " column");
  }
  return Column{static_cast<const uint8_t*>(col.data()), col.strides(0)};
}

// ptr, size, phase, module: the uint64 / int64 / int8 / int32 columns of an event array
// (strided views are read in place).
py::tuple pair_allocations(py::array ptr, py::array size, py::array phase, py::array module) {
  Column p = checked_column(ptr, 8, "ptr");
  Column s = checked_column(size, 8, "size");
  Column ph = checked_column(phase, 1, "phase");
  Column mod = checked_column(module, 4, "module");
  ssize_t n = ptr.shape(0);
  if (size.shape(0) != n || phase.shape(0) != n || module.shape(0) != n) {
    throw py::value_error("pair_allocations: expected columns of one length");
  }
  if (n < (ssize_t(1) << 31)) return pair<int32_t>(p, s, ph, mod, n);
  return pair<int64_t>(p, s, ph, mod, n);
}

// For queries (address, position): the allocation alive at that address just before the event
// at that position - allocated before it, not freed before it - replaying the stream once with
// the same table as the pairing (the category snapshots' storages, thousands per step of a long
// run: a sort of every allocation by address did this in numpy, about a third of leaving).
py::tuple allocations_alive_at(py::array ptr, py::array size, py::array_t<uint64_t> query_ptr,
                               py::array_t<int64_t> query_pos) {
  Column p = checked_column(ptr, 8, "ptr", "allocations_alive_at");
  Column s = checked_column(size, 8, "size", "allocations_alive_at");
  const ssize_t n = ptr.shape(0), q = query_ptr.size();
  if (size.shape(0) != n || query_pos.size() != q) {
    throw py::value_error("allocations_alive_at: expected columns of one length");
  }
  auto qp = query_ptr.unchecked<1>();
  auto qs = query_pos.unchecked<1>();
  std::vector<int64_t> order(q);
  for (ssize_t k = 0; k < q; ++k) order[k] = k;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return qs(a) < qs(b); });
  std::vector<int64_t> hit_query, hit_alloc;
  {
    py::gil_scoped_release release;
    LiveBlocks live;
    ssize_t i = 0;
    for (int64_t k : order) {
      const int64_t at = std::clamp<int64_t>(qs(k), 0, n);
      for (; i < at; ++i) {
        uint64_t addr = p.at<uint64_t>(i);
        int64_t bytes = s.at<int64_t>(i);
        if (addr != 0 && bytes > 0) {
          live.put(addr, i);
        } else if (bytes < 0 && addr != 0) {
          live.take(addr);
        }
      }
      int64_t alloc = qp(k) != 0 ? live.find(qp(k)) : -1;
      if (alloc >= 0) {
        hit_query.push_back(k);
        hit_alloc.push_back(alloc);
      }
    }
  }
  // in query order (a later snapshot's naming after an earlier one's)
  std::vector<int64_t> by_query(hit_query.size());
  for (size_t h = 0; h < by_query.size(); ++h) by_query[h] = static_cast<int64_t>(h);
  std::sort(by_query.begin(), by_query.end(),
            [&](int64_t a, int64_t b) { return hit_query[a] < hit_query[b]; });
  py::array_t<int64_t> queries(by_query.size()), allocs(by_query.size());
  auto oq = queries.mutable_unchecked<1>();
  auto oa = allocs.mutable_unchecked<1>();
  for (size_t h = 0; h < by_query.size(); ++h) {
    oq(h) = hit_query[by_query[h]];
    oa(h) = hit_alloc[by_query[h]];
  }
  return py::make_tuple(queries, allocs);
}

}  // namespace

void register_pairs(py::module_& m) {
  m.def("pair_allocations", &pair_allocations, py::arg("ptr"), py::arg("size"),
        py::arg("phase"), py::arg("module"),
        "(free_of, alloc_of, size, phase, module, effective_size, live) of an event stream, in "
        "one pass: for each allocation the index of its free (-1: alive at the end), for each "
        "free the index of its allocation (-1: a block from before the stream), int32 below "
        "2**31 events; contiguous size (int64), phase (int8) and module (int32) columns; the "
        "size with frees of blocks not allocated in the stream as 0, and its running sum (live "
        "bytes after each event).");
  m.def("allocations_alive_at", &allocations_alive_at, py::arg("ptr"), py::arg("size"),
        py::arg("query_ptr"), py::arg("query_pos"),
        "(query indices, allocation events), in query order: for each query (address, "
        "position) with an allocation at that address made before the event at that position "
        "and not freed before it, that allocation (one replay of the stream's live blocks).");
}

}  // namespace memprof

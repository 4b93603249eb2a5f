// Per-event columns of a profile that the numpy way built with a dozen full passes each.
//
// A profile's category column (and a free taking its allocation's value) touches every event;
// in numpy each rule was a pass of its own over millions of events, with a temporary array per
// rule, and the categories alone cost more than draining the native log. Here each is one loop.
// tests/record/test_columns.py keeps the numpy rules as the reference these must equal.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "bindings.h"
#include "events.h"

namespace py = pybind11;

namespace memprof {
namespace {

using Int64Column = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using Int8Column = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;

struct CategoryCodes {
  int8_t activations, temporaries, other, communication;
};

// Walked from the last event back, so the end of the current phase run and the next
// forward_end marker are known when an allocation is reached; its free is always later.
template <typename Index>
void categorise(const int64_t* size, const int8_t* phase, const Index* free_of, ssize_t n,
                const int64_t* forward_ends, ssize_t n_forward_ends, const uint8_t* op_col,
                ssize_t op_stride, const std::vector<bool>& communication_op,
                CategoryCodes codes, int8_t* cat) {
  ssize_t run_end = n - 1;
  ssize_t next_forward_end = n_forward_ends;  // first forward_end position > i
  for (ssize_t i = n - 1; i >= 0; --i) {
    if (i < n - 1 && phase[i] != phase[i + 1]) run_end = i;
    while (next_forward_end > 0 && forward_ends[next_forward_end - 1] > i) --next_forward_end;
    cat[i] = codes.other;
    if (size[i] <= 0) continue;
    int64_t freed_at = free_of[i];
    bool freed = freed_at >= 0;
    int8_t c = codes.other;
    if (phase[i] == kPhaseForward) {
      // outliving its forward pass (saved for backward, an output, a retained graph)
      int64_t forward_end =
          next_forward_end < n_forward_ends ? forward_ends[next_forward_end] : n;
      c = (!freed || freed_at >= forward_end) ? codes.activations : codes.temporaries;
    } else if (freed && freed_at <= run_end) {
      c = codes.temporaries;  // freed before its phase run ended
    }
    // made outside backward and released by it: saved for backward (a loss's own tensors)
    if (phase[i] != kPhaseBackward && freed && phase[freed_at] == kPhaseBackward) {
      c = codes.activations;
    }
    if (op_col) {
      int32_t op = *reinterpret_cast<const int32_t*>(op_col + i * op_stride);
      if (op >= 0 && static_cast<size_t>(op) < communication_op.size() && communication_op[op]) {
        c = codes.communication;  // made inside a collective
      }
    }
    cat[i] = c;
  }
}

// size, phase, free_of: the profile's contiguous columns; forward_ends: memory positions of the
// forward_end markers, ascending; op: the op column (read in place) when communication_ops
// (string ids of c10d ops) is not empty.
py::array_t<int8_t> allocation_categories(Int64Column size, Int8Column phase, py::array free_of,
                                          Int64Column forward_ends, py::array op,
                                          const std::vector<int64_t>& communication_ops,
                                          int8_t activations, int8_t temporaries, int8_t other,
                                          int8_t communication) {
  ssize_t n = size.size();
  if (size.ndim() != 1 || phase.ndim() != 1 || free_of.ndim() != 1 || phase.size() != n ||
      free_of.shape(0) != n || forward_ends.ndim() != 1) {
    throw py::value_error("allocation_categories: expected 1-D columns of one length");
  }
  if (!free_of.dtype().is(py::dtype::of<int32_t>()) &&
      !free_of.dtype().is(py::dtype::of<int64_t>())) {
    throw py::value_error("allocation_categories: free_of must be int32 or int64");
  }
  if (!(free_of.flags() & py::array::c_style)) {
    throw py::value_error("allocation_categories: free_of must be contiguous");
  }
  std::vector<bool> communication_op;
  for (int64_t id : communication_ops) {
    if (id < 0) continue;
    if (static_cast<size_t>(id) >= communication_op.size()) communication_op.resize(id + 1);
    communication_op[id] = true;
  }
  const uint8_t* op_col = nullptr;
  ssize_t op_stride = 0;
  if (!communication_op.empty()) {
    if (op.ndim() != 1 || op.shape(0) != n || op.itemsize() != 4) {
      throw py::value_error("allocation_categories: expected the int32 op column");
    }
    op_col = static_cast<const uint8_t*>(op.data());
    op_stride = op.strides(0);
  }
  py::array_t<int8_t> cat(n);
  CategoryCodes codes{activations, temporaries, other, communication};
  int8_t* out = cat.mutable_data();
  {
    py::gil_scoped_release release;
    if (free_of.itemsize() == 4) {
      categorise(size.data(), phase.data(), static_cast<const int32_t*>(free_of.data()), n,
                 forward_ends.data(), forward_ends.size(), op_col, op_stride, communication_op,
                 codes, out);
    } else {
      categorise(size.data(), phase.data(), static_cast<const int64_t*>(free_of.data()), n,
                 forward_ends.data(), forward_ends.size(), op_col, op_stride, communication_op,
                 codes, out);
    }
  }
  return cat;
}

template <typename Value, typename Index>
void take_from_allocs(Value* values, const int64_t* size, const Index* alloc_of, ssize_t n,
                      std::optional<Value> unknown) {
  for (ssize_t i = 0; i < n; ++i) {
    if (size[i] >= 0) continue;
    int64_t owner = alloc_of[i];
    if (owner >= 0) {
      values[i] = values[owner];  // an allocation: never rewritten by this loop
    } else if (unknown) {
      values[i] = *unknown;
    }
  }
}

template <typename Value>
void take_from_allocs_any_index(py::array& values, const int64_t* size, const py::array& alloc_of,
                                ssize_t n, std::optional<int64_t> unknown) {
  auto* v = static_cast<Value*>(values.mutable_data());
  std::optional<Value> u;
  if (unknown) u = static_cast<Value>(*unknown);
  py::gil_scoped_release release;
  if (alloc_of.itemsize() == 4) {
    take_from_allocs(v, size, static_cast<const int32_t*>(alloc_of.data()), n, u);
  } else {
    take_from_allocs(v, size, static_cast<const int64_t*>(alloc_of.data()), n, u);
  }
}

// In place: values[free] = values[its allocation]; a free of a block allocated before the
// stream gets `unknown` (None: keeps its own value).
void frees_take_their_alloc(py::array values, Int64Column size, py::array alloc_of,
                            std::optional<int64_t> unknown) {
  ssize_t n = size.size();
  if (values.ndim() != 1 || alloc_of.ndim() != 1 || values.shape(0) != n ||
      alloc_of.shape(0) != n) {
    throw py::value_error("frees_take_their_alloc: expected 1-D columns of one length");
  }
  if (!values.writeable() || !(values.flags() & py::array::c_style) ||
      !(alloc_of.flags() & py::array::c_style) ||
      !(alloc_of.dtype().is(py::dtype::of<int32_t>()) ||
        alloc_of.dtype().is(py::dtype::of<int64_t>()))) {
    throw py::value_error("frees_take_their_alloc: expected a writeable contiguous values "
                          "column and a contiguous int32/int64 alloc_of");
  }
  if (values.dtype().is(py::dtype::of<int8_t>())) {
    take_from_allocs_any_index<int8_t>(values, size.data(), alloc_of, n, unknown);
  } else if (values.dtype().is(py::dtype::of<int32_t>())) {
    take_from_allocs_any_index<int32_t>(values, size.data(), alloc_of, n, unknown);
  } else if (values.dtype().is(py::dtype::of<int64_t>())) {
    take_from_allocs_any_index<int64_t>(values, size.data(), alloc_of, n, unknown);
  } else {
    throw py::value_error("frees_take_their_alloc: values must be int8, int32 or int64");
  }
}

}  // namespace

void register_columns(py::module_& m) {
  m.def("allocation_categories", &allocation_categories, py::arg("size"), py::arg("phase"),
        py::arg("free_of"), py::arg("forward_ends"), py::arg("op"),
        py::arg("communication_ops"), py::arg("activations"), py::arg("temporaries"),
        py::arg("other"), py::arg("communication"),
        "Category code (int8) per allocation from phases and lifetimes; frees and empty events "
        "get `other` (Profile.category then gives frees their allocation's).");
  m.def("frees_take_their_alloc", &frees_take_their_alloc, py::arg("values"), py::arg("size"),
        py::arg("alloc_of"), py::arg("unknown") = py::none(),
        "In place: each free gets its allocation's value; one of a block from before the "
        "stream gets `unknown` (None: keeps its own).");
}

}  // namespace memprof

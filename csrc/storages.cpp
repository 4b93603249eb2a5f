// Which storages a list of tensors holds, read in C++: the snapshots of gradients and optimizer
// state run at every optimizer step (record/snapshots.py), and in Python they cost a few
// microseconds per tensor - milliseconds per step for a model of a few hundred parameters.
#include "bindings.h"

#include <c10/core/DispatchKeySet.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace memprof {
namespace {

// The keys of tensors that wrap another one (functionalization, functorch's grad and vmap):
// their own storage is not the allocation.
const c10::DispatchKeySet kWrapperKeys({c10::DispatchKey::Functionalize,
                                        c10::DispatchKey::FuncTorchGradWrapper,
                                        c10::DispatchKey::FuncTorchBatched,
                                        c10::DispatchKey::BatchedNestedTensor});

// A torch.Tensor or nn.Parameter that wraps nothing (snapshots.is_plain_tensor), else null.
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.key_set().has_any(kWrapperKeys)) return nullptr;
  return &t;
}

// The storage's data address; 0 for a tensor without storage or data (sparse, meta); -1 where
// reading it throws (torch.compile's CUDA graphs mark overwritten outputs' storages unreadable).
int64_t address(const at::Tensor& t) {
  if (!t.has_storage()) return 0;
  try {
    return reinterpret_cast<int64_t>(t.storage().data());
  } catch (const c10::Error&) {
    return -1;
  }
}

py::list plain_storage_addresses(const py::sequence& tensors) {
  py::list out;
  for (py::handle item : py::list(tensors)) {   // the new list owns its items
    const at::Tensor* t = plain_tensor(item.ptr());
    out.append(py::int_(t == nullptr ? -1 : address(*t)));
  }
  return out;
}

// The storages a list of tensors held when it was noted: weak references keep each
// StorageImpl's object (not its memory) from being freed, so while one is alive an equal
// address is the same storage, and an equal data address the same allocation.
class StorageNote {
 public:
  // Notes the tensors' storages; false (and nothing noted) unless all are plain tensors with
  // a readable storage (an empty one included: its identity is what is compared).
  bool note(const py::sequence& tensors) {
    std::vector<Entry> entries;
    const py::list items(tensors);   // a list owns its items
    entries.reserve(items.size());
    for (py::handle item : items) {   // owned by items
      const at::Tensor* t = plain_tensor(item.ptr());
      const int64_t at = t != nullptr && t->has_storage() ? address(*t) : -1;
      if (at < 0) {
        entries_.clear();
        valid_ = false;
        return false;
      }
      entries.push_back(Entry{t->storage().getWeakStorageImpl(), at});
    }
    entries_ = std::move(entries);
    valid_ = true;
    return true;
  }

  // Whether the tensors hold, in order, the very storages noted, alive, at the same addresses.
  bool same(const py::sequence& tensors) const {
    const py::list items(tensors);
    if (!valid_ || items.size() != entries_.size()) return false;
    size_t i = 0;
    for (py::handle item : items) {   // owned by items
      if (!matches(entries_[i++], item.ptr())) return false;
    }
    return true;
  }

  // same() for the tensors of an optimizer's state ({param: {name: value}}), in the order
  // snapshots.state_pairs lists them (tensors, and the tensors in list or tuple values),
  // without building that list: this runs after every optimizer step.
  bool same_state(const py::object& state) const {
    if (!valid_ || !PyDict_Check(state.ptr())) return false;   // another mapping: take anew
    size_t i = 0;
    for (auto item : py::reinterpret_borrow<py::dict>(state)) {
      if (!PyDict_Check(item.second.ptr())) return false;
      for (auto field : py::reinterpret_borrow<py::dict>(item.second)) {
        PyObject* v = field.second.ptr();
        if (THPVariable_Check(v)) {
          if (i >= entries_.size() || !matches(entries_[i++], v)) return false;
        } else if (PyList_Check(v) || PyTuple_Check(v)) {
          for (py::handle x : py::list(py::reinterpret_borrow<py::object>(field.second))) {
            if (!THPVariable_Check(x.ptr())) continue;
            if (i >= entries_.size() || !matches(entries_[i++], x.ptr())) return false;
          }
        }
      }
    }
    return i == entries_.size();
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    int64_t address;
  };

  static bool matches(const Entry& e, PyObject* obj) {
    const at::Tensor* t = plain_tensor(obj);
    if (t == nullptr || !t->has_storage() || e.storage.expired()) return false;
    return t->storage().unsafeGetStorageImpl() == e.storage._unsafe_get_target() &&
           address(*t) == e.address;   // -1 (unreadable) never equals a noted address
  }
  std::vector<Entry> entries_;
  bool valid_ = false;
};

}  // namespace

void register_storages(py::module_& m) {
  m.def("plain_storage_addresses", &plain_storage_addresses, py::arg("tensors"),
        "Per tensor: its storage's data address (0: none) if it is a plain torch.Tensor or "
        "Parameter, else -1 (fake, DTensor, functional or functorch-wrapped: ask Python).");
  py::class_<StorageNote>(m, "StorageNote",
                          "The storages a list of plain tensors held when noted (weakly).")
      .def(py::init<>())
      .def("note", &StorageNote::note, py::arg("tensors"),
           "Note the tensors' storages; False (nothing noted) unless all are plain tensors with "
           "a readable storage.")
      .def("same", &StorageNote::same, py::arg("tensors"),
           "Whether the tensors hold, in order, the very storages noted, at the same "
           "addresses.")
      .def("same_state", &StorageNote::same_state, py::arg("state"),
           "same() for the tensors of an optimizer's state dict, in state_pairs' order.");
}

}  // namespace memprof

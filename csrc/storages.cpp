// Which storages a list of tensors holds, read in C++: the snapshots of gradients and optimizer
// state run at every optimizer step (record/snapshots.py), and in Python they cost a few
// microseconds per tensor - milliseconds per step for a model of a few hundred parameters.
#include "address_watch.h"
#include "bindings.h"

#include <c10/core/DispatchKeySet.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
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

// What a snapshot names: address(t), but 0 for a block whose allocation the event log dropped
// (it was full, see allocated_past_the_log): the log cannot hold that block, and its address
// may be a logged block's whose free was dropped as well.
int64_t snapshot_address(const at::Tensor& t) {
  const int64_t at = address(t);
  if (at <= 0) return at;
  if (t.is_cuda()) return cuda_block_past_the_log(static_cast<uint64_t>(at)) ? 0 : at;
  if (!t.is_cpu()) return at;
  return allocated_past_the_log(t.storage().data_ptr().get_deleter()) ? 0 : at;
}

py::list plain_storage_addresses(const py::sequence& tensors) {
  py::list out;
  for (py::handle item : py::list(tensors)) {   // the new list owns its items
    const at::Tensor* t = plain_tensor(item.ptr());
    out.append(py::int_(t == nullptr ? -1 : snapshot_address(*t)));
  }
  return out;
}

// One noted storage: a weak reference keeps its StorageImpl's object (not its memory) from
// being freed, so while it is alive an equal address is the same storage, and an equal data
// address the same allocation.
struct NotedStorage {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  int64_t address;
};

NotedStorage note_storage(const at::Tensor& t, int64_t at) {
  return NotedStorage{t.storage().getWeakStorageImpl(), at};
}

// Whether a tensor with a storage holds the noted one, alive, at the noted address.
bool holds(const NotedStorage& noted, const at::Tensor& t) {
  return !noted.storage.expired() &&
         t.storage().unsafeGetStorageImpl() == noted.storage._unsafe_get_target() &&
         address(t) == noted.address;   // -1 (unreadable) never equals a noted address
}

// The storages a list of tensors held when it was noted (see NotedStorage).
class StorageNote {
 public:
  // Notes the tensors' storages; false (and nothing noted) unless all are plain tensors with
  // a readable storage (an empty one included: its identity is what is compared).
  bool note(const py::sequence& tensors) {
    std::vector<NotedStorage> entries;
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
      entries.push_back(note_storage(*t, at));
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
  static bool matches(const NotedStorage& noted, PyObject* obj) {
    const at::Tensor* t = plain_tensor(obj);
    return t != nullptr && t->has_storage() && holds(noted, *t);
  }
  std::vector<NotedStorage> entries_;
  bool valid_ = false;
};

// The sorted storage addresses of the buffers of (module or weak reference to it, module id)
// pairs, freed modules skipped (the modules' own `_buffers`, None entries skipped, addresses 0
// dropped), what snapshots.note_buffers compares
// at every step end; None when a buffer is not a plain tensor or a module has no `_buffers`
// dict (the Python path decides).
py::object module_buffer_addresses(const py::list& module_ids) {
  std::vector<int64_t> out;
  for (py::handle pair : module_ids) {
    if (!PyTuple_Check(pair.ptr()) || PyTuple_GET_SIZE(pair.ptr()) != 2) return py::none();
    PyObject* module = PyTuple_GET_ITEM(pair.ptr(), 0);   // borrowed
    py::object alive;   // a weak reference's module, held for the lookups below
    if (PyWeakref_CheckRef(module)) {
#if PY_VERSION_HEX >= 0x030D0000
      PyObject* target = nullptr;   // a new reference, or none once freed
      if (PyWeakref_GetRef(module, &target) < 0) {
        PyErr_Clear();
        return py::none();
      }
      if (target == nullptr) continue;   // a module replaced or deleted in the block
      alive = py::reinterpret_steal<py::object>(target);
#else
      PyObject* target = PyWeakref_GetObject(module);   // borrowed; None once freed
      if (target == nullptr) {
        PyErr_Clear();
        return py::none();
      }
      if (target == Py_None) continue;   // a module replaced or deleted in the block
      alive = py::reinterpret_borrow<py::object>(target);
#endif
      module = target;
    }
    PyObject* buffers = PyObject_GetAttrString(module, "_buffers");
    if (buffers == nullptr) {
      PyErr_Clear();
      return py::none();
    }
    py::object owned = py::reinterpret_steal<py::object>(buffers);
    if (!PyDict_Check(buffers)) return py::none();
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(buffers, &pos, &key, &value)) {   // borrowed
      if (value == Py_None) continue;
      const at::Tensor* t = plain_tensor(value);
      if (t == nullptr) return py::none();
      const int64_t at = snapshot_address(*t);
      if (at < 0) return py::none();
      if (at > 0) out.push_back(at);
    }
  }
  std::sort(out.begin(), out.end());
  py::list result;
  for (int64_t at : out) result.append(py::int_(at));
  return std::move(result);
}

// The gradients of one optimizer's parameters, read before each of its steps: whether they are
// the storages noted last time and, when not, which storages they are now and whose. The
// Python version of this (a list of parameters with a gradient, their gradients, a note,
// the owners, a sort) cost ~1 us per parameter, and it runs at every step: gradients made
// anew by zero_grad(set_to_none=True) are new storages each time. Plain tensors only; any
// other parameter or gradient (fake, DTensor, functional, a __torch_dispatch__ subclass)
// hands the step back to the Python path.
//
// "The very storages" is told without holding them (address_watch.h): the same storage object
// at the same data address, and no allocation at any noted address since the note (the tracker
// marks the note's watch), within one recording session (outside one: never the same). A weak
// reference to each storage, as StorageNote keeps for the long-lived optimizer state and
// buffers, kept every step's freed gradients' storage objects alive until the next step's
// note, and the step's kernels ran slower for where the heap then put its tensors.
py::bytes as_bytes(const std::vector<int64_t>& values) {
  return py::bytes(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(int64_t));
}

class GradientNote {
 public:
  GradientNote() = default;
  GradientNote(const GradientNote&) = delete;
  GradientNote& operator=(const GradientNote&) = delete;
  ~GradientNote() { release_address_watch(watch_); }

  // None: the very storages noted last time, and no parameter's module named since (the
  // size of `param_module`, which only grows, is unchanged). False: not all plain; the
  // caller takes the Python path (nothing noted). Else (addresses, modules): the gradients'
  // distinct storage addresses in param_groups order, and per address the module id of the
  // first parameter whose gradient it holds, from param_module {id(param): module id} (-1
  // where absent), each as native int64 bytes (an array('q') in Python: 8 bytes per entry
  // kept for the run, where a list of ints took ~48 and 2 objects per parameter per step);
  // the note is then these storages.
  py::object take(const py::object& param_groups, const py::dict& param_module) {
    if (!PyList_Check(param_groups.ptr())) return py::bool_(false);   // a wrapper's own type
    const Py_ssize_t owners_known = PyDict_Size(param_module.ptr());
    std::vector<PyObject*> params;   // borrowed: the groups' lists hold them during the call
    std::vector<NotedGradient> entries;
    params.reserve(params_.size());
    entries.reserve(entries_.size());
    const uint64_t session = recording_session();
    bool same = valid_ && session != 0 && session == session_ &&
                owners_known == owners_known_ && !watch_->hit();
    bool all_hooked = true;   // every gradient on a device whose allocations the tracker sees
    for (py::handle group : py::reinterpret_borrow<py::list>(param_groups)) {
      if (!PyDict_Check(group.ptr())) return py::bool_(false);
      PyObject* list = PyDict_GetItemString(group.ptr(), "params");   // borrowed
      if (list == nullptr || !PyList_Check(list)) return py::bool_(false);
      for (Py_ssize_t i = 0, n = PyList_GET_SIZE(list); i < n; ++i) {
        PyObject* param = PyList_GET_ITEM(list, i);
        if (!THPVariable_CheckExact(param)) return py::bool_(false);
        const at::Tensor& grad = THPVariable_Unpack(param).unsafeGetTensorImpl()->grad();
        if (!grad.defined()) continue;
        if (grad.key_set().has_any(kWrapperKeys) ||
            grad.key_set().has(c10::DispatchKey::Python) || !grad.has_storage()) {
          return py::bool_(false);
        }
        const int64_t at = address(grad);
        if (at < 0) return py::bool_(false);
        const c10::StorageImpl* impl = grad.storage().unsafeGetStorageImpl();
        const size_t k = entries.size();
        if (same && (k >= entries_.size() || entries_[k].storage != impl ||
                     entries_[k].address != at)) {
          same = false;
        }
        all_hooked = all_hooked && (grad.is_cpu() || grad.is_cuda());
        entries.push_back(NotedGradient{impl, at, at > 0 ? snapshot_address(grad) : at});
        params.push_back(param);
      }
    }
    if (same && entries.size() == entries_.size()) return py::none();
    // Module ids, looked up again only when the parameters with a gradient or the owners
    // known changed (the cache holds the parameters, so their addresses cannot be reused).
    if (owners_known != owners_known_ || params.size() != params_.size() ||
        !std::equal(params.begin(), params.end(), params_.begin(),
                    [](PyObject* a, const py::object& b) { return a == b.ptr(); })) {
      params_.clear();
      modules_.clear();
      for (PyObject* param : params) {
        params_.push_back(py::reinterpret_borrow<py::object>(param));
        py::object key = py::reinterpret_steal<py::object>(PyLong_FromVoidPtr(param));
        PyObject* mid = PyDict_GetItemWithError(param_module.ptr(), key.ptr());   // borrowed
        if (mid == nullptr && PyErr_Occurred()) throw py::error_already_set();
        modules_.push_back(mid == nullptr ? -1 : PyLong_AsLong(mid));
      }
    }
    // Parameter order, each address once (the first owner wins): the owners then read the
    // same at every step while the parameters with a gradient do, and Python keeps one array
    // of them for the run (sorted by address, as before, they changed with every step's
    // addresses).
    std::vector<std::pair<int64_t, size_t>> by_address;   // (address, parameter position)
    by_address.reserve(entries.size());
    for (size_t i = 0; i < entries.size(); ++i) {
      if (entries[i].named > 0) by_address.emplace_back(entries[i].named, i);
    }
    std::sort(by_address.begin(), by_address.end());
    std::vector<bool> first_owner(entries.size(), false);
    for (size_t i = 0; i < by_address.size(); ++i) {
      if (i == 0 || by_address[i].first != by_address[i - 1].first) {
        first_owner[by_address[i].second] = true;
      }
    }
    std::vector<int64_t> addresses, modules;   // handed over as int64 bytes (see take's doc)
    addresses.reserve(by_address.size());
    modules.reserve(by_address.size());
    for (size_t i = 0; i < entries.size(); ++i) {
      if (!first_owner[i]) continue;
      addresses.push_back(entries[i].named);
      modules.push_back(modules_[i]);
    }
    std::vector<int64_t> noted;
    noted.reserve(entries.size());
    for (const NotedGradient& e : entries) noted.push_back(e.address);
    if (watch_ == nullptr) watch_ = acquire_address_watch();
    entries_ = std::move(entries);
    owners_known_ = owners_known;
    session_ = session;
    // comparable next time only while every noted address is watched
    valid_ = all_hooked && watch_ != nullptr && watch_->watch(noted);
    return py::make_tuple(as_bytes(addresses), as_bytes(modules));
  }

  // Drops the note and the parameters it holds (the session is over).
  void forget() {
    release_address_watch(watch_);
    watch_ = nullptr;
    entries_.clear();
    params_.clear();
    modules_.clear();
    valid_ = false;
  }

 private:
  struct NotedGradient {
    const c10::StorageImpl* storage;   // compared, never followed
    int64_t address;
    int64_t named;   // snapshot_address: 0 where the log holds no allocation for the block
  };
  std::vector<NotedGradient> entries_;
  AddressWatch* watch_ = nullptr;    // the noted addresses, while valid_
  uint64_t session_ = 0;             // the recording session they were noted in
  std::vector<py::object> params_;   // the parameters with a gradient at the last take
  std::vector<int64_t> modules_;     // their module ids
  Py_ssize_t owners_known_ = -1;
  bool valid_ = false;
};

}  // namespace

void register_storages(py::module_& m) {
  m.def("plain_storage_addresses", &plain_storage_addresses, py::arg("tensors"),
        "Per tensor: its storage's data address as a snapshot names it (0: none, or a block "
        "allocated while the event log was full) if it is a plain torch.Tensor or Parameter, "
        "else -1 (fake, DTensor, functional or functorch-wrapped: ask Python).");
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
  m.def("module_buffer_addresses", &module_buffer_addresses, py::arg("module_ids"),
        "Sorted storage addresses of the buffers of (module, id) pairs, as a snapshot names "
        "them (a block allocated while the event log was full left out); None if one is not a "
        "plain tensor (ask Python).");
  py::class_<GradientNote>(m, "GradientNote",
                           "The gradients of one optimizer's parameters at its last step.")
      .def(py::init<>())
      .def("take", &GradientNote::take, py::arg("param_groups"), py::arg("param_module"),
           "None if the gradients are the storages noted last time; False if not all plain "
           "(take the Python path); else (storage addresses in parameter order, module id per "
           "address), each as int64 bytes.")
      .def("forget", &GradientNote::forget, "Drop the note and the parameters it holds.");
}

}  // namespace memprof

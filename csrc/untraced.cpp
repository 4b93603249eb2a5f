// memprof's own walks of the user's objects (the leak probe's, the end-of-block leak check's)
// with the thread's trace and profile functions suspended: under a script's coverage tool,
// debugger or line profiler every line of a walk was an event of the user's tracer (over a
// minute for a 4-step loop). Suspended and put back at the C level, as they were installed:
// a C tracer (cProfile, coverage's CTracer) is no Python callable that sys.settrace could take
// back. Only this thread's: threading.settrace / setprofile hooks stay as they are.
#include <Python.h>

#include "bindings.h"

namespace memprof {
namespace {

class Untraced {
 public:
  Untraced() = default;
  Untraced(const Untraced&) = delete;
  Untraced& operator=(const Untraced&) = delete;
  ~Untraced() {   // (left without __exit__: the references only, never another thread's)
    Py_XDECREF(trace_obj_);
    Py_XDECREF(profile_obj_);
  }

  void enter() {
    if (entered_) throw std::runtime_error("memprof._C.untraced(): entered twice");
    PyThreadState* ts = PyThreadState_Get();
    trace_ = ts->c_tracefunc;
    trace_obj_ = ts->c_traceobj;
    profile_ = ts->c_profilefunc;
    profile_obj_ = ts->c_profileobj;
    Py_XINCREF(trace_obj_);
    Py_XINCREF(profile_obj_);
    entered_ = true;
    if (profile_ != nullptr) PyEval_SetProfile(nullptr, nullptr);
    if (trace_ != nullptr) PyEval_SetTrace(nullptr, nullptr);
  }

  // Puts back what enter() found, also when the block raised (never suppresses it).
  bool exit(const pybind11::args&) {
    if (!entered_) return false;
    entered_ = false;
    if (trace_ != nullptr) PyEval_SetTrace(trace_, trace_obj_);
    if (profile_ != nullptr) PyEval_SetProfile(profile_, profile_obj_);
    Py_XDECREF(trace_obj_);
    Py_XDECREF(profile_obj_);
    trace_obj_ = profile_obj_ = nullptr;
    return false;
  }

 private:
  bool entered_ = false;
  Py_tracefunc trace_ = nullptr;
  Py_tracefunc profile_ = nullptr;
  PyObject* trace_obj_ = nullptr;
  PyObject* profile_obj_ = nullptr;
};

}  // namespace

void register_untraced(pybind11::module_& m) {
  pybind11::class_<Untraced>(m, "untraced",
                             "`with untraced():` this thread's sys.settrace / sys.setprofile "
                             "functions suspended, and put back exactly on leaving")
      .def(pybind11::init<>())
      .def("__enter__", [](Untraced& self) { self.enter(); })
      .def("__exit__", &Untraced::exit);
}

}  // namespace memprof

// outside_dynamo(fn, *args): fn(*args) with dynamo's frame callback off on this thread while
// it runs, if it is on (see memprof/record/module_call.py for why memprof's own bookkeeping
// must not be compiled). A training step calls it ~6 times (a pass's start and end, the
// optimizer hooks, the backward wrapper), each right after the step's kernels have evicted
// memprof's code: as a Python function it was a frame of its own plus an argument tuple per
// call; here it is one C call in front of fn, and dynamo's callback is read through the two
// functions memprof was given (set_frame_callback), not imported.
#include "bindings.h"

#include <Python.h>

namespace memprof {
namespace {

// dynamo's get_eval_frame_callback() and set_eval_frame(callback), once dynamo is loaded
// (strong references, kept for the process: they are functions of torch's own extension)
PyObject* g_get_callback = nullptr;
PyObject* g_set_callback = nullptr;

PyObject* set_frame_callback(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n != 2 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError,
                    "set_frame_callback(get, set): expected two callables (dynamo's "
                    "get_eval_frame_callback and set_eval_frame)");
    return nullptr;
  }
  Py_INCREF(args[0]);
  Py_INCREF(args[1]);
  Py_XSETREF(g_get_callback, args[0]);
  Py_XSETREF(g_set_callback, args[1]);
  Py_RETURN_NONE;
}

// set_eval_frame(callback) after fn ran: fn's own error (if any) stays the one raised, and a
// failure to put the callback back is raised with fn's as its context, as a `finally` does
PyObject* restore_callback(PyObject* callback, PyObject* result) {
  PyObject *type, *value, *traceback;
  PyErr_Fetch(&type, &value, &traceback);
  PyObject* back = PyObject_CallOneArg(g_set_callback, callback);
  if (back != nullptr) {
    Py_DECREF(back);
    PyErr_Restore(type, value, traceback);
    return result;
  }
  Py_XDECREF(result);
  if (type != nullptr) {
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != nullptr) PyException_SetTraceback(value, traceback);
    PyObject *new_type, *new_value, *new_traceback;
    PyErr_Fetch(&new_type, &new_value, &new_traceback);
    PyErr_NormalizeException(&new_type, &new_value, &new_traceback);
    PyException_SetContext(new_value, value);   // (steals value)
    Py_DECREF(type);
    Py_XDECREF(traceback);
    PyErr_Restore(new_type, new_value, new_traceback);
  }
  return nullptr;
}

PyObject* outside_dynamo(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n < 1) {
    PyErr_SetString(PyExc_TypeError, "outside_dynamo(fn, *args): expected the function");
    return nullptr;
  }
  PyObject* fn = args[0];
  if (g_get_callback == nullptr) return PyObject_Vectorcall(fn, args + 1, n - 1, nullptr);
  PyObject* callback = PyObject_CallNoArgs(g_get_callback);
  if (callback == nullptr) return nullptr;
  if (callback == Py_None) {
    Py_DECREF(callback);
    return PyObject_Vectorcall(fn, args + 1, n - 1, nullptr);
  }
  PyObject* off = PyObject_CallOneArg(g_set_callback, Py_None);
  if (off == nullptr) {
    Py_DECREF(callback);
    return nullptr;
  }
  Py_DECREF(off);
  PyObject* result = PyObject_Vectorcall(fn, args + 1, n - 1, nullptr);
  result = restore_callback(callback, result);
  Py_DECREF(callback);
  return result;
}

// (static: CPython keeps pointers to the definitions for the functions' lifetime)
PyMethodDef kCalls[] = {
    {"outside_dynamo", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(outside_dynamo)),
     METH_FASTCALL,
     "outside_dynamo(fn, /, *args)\n--\n\n"
     "fn(*args) with dynamo's frame callback off on this thread while it runs, if it is on."},
    {"set_frame_callback",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(set_frame_callback)), METH_FASTCALL,
     "set_frame_callback(get, set, /)\n--\n\n"
     "dynamo's get_eval_frame_callback and set_eval_frame, for outside_dynamo."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void register_outside_dynamo(pybind11::module_& m) {
  for (PyMethodDef* def = kCalls; def->ml_name != nullptr; ++def) {
    PyObject* fn = PyCFunction_NewEx(def, m.ptr(), m.attr("__name__").ptr());
    if (fn == nullptr) throw pybind11::error_already_set();
    m.attr(def->ml_name) = pybind11::reinterpret_steal<pybind11::object>(fn);
  }
}

}  // namespace memprof

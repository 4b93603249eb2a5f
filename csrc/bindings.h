// Each native component registers its Python bindings into memprof._C.
#pragma once
#include <pybind11/pybind11.h>

namespace memprof {
void register_events(pybind11::module_& m);
void register_tracker(pybind11::module_& m);
void register_allocator_sim(pybind11::module_& m);
void register_pairs(pybind11::module_& m);
void register_columns(pybind11::module_& m);
void register_storages(pybind11::module_& m);
void register_exit_signal(pybind11::module_& m);
void register_outside_dynamo(pybind11::module_& m);
void register_untraced(pybind11::module_& m);
}  // namespace memprof

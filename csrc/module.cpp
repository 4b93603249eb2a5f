#include "bindings.h"

namespace memprof {
void register_allocator_sim(pybind11::module_& m) __attribute__((weak));  // TEMP-DEV
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "memprof native core: allocation/op event log and CUDA caching-allocator simulator";
  memprof::register_tracker(m);
  if (&memprof::register_allocator_sim) memprof::register_allocator_sim(m);  // TEMP-DEV
}

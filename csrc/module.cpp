#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "memprof native core: allocation/op event log and CUDA caching-allocator simulator";
  memprof::register_events(m);
  memprof::register_tracker(m);
  memprof::register_allocator_sim(m);
  memprof::register_pairs(m);
  memprof::register_columns(m);
  memprof::register_storages(m);
  memprof::register_exit_signal(m);
  memprof::register_outside_dynamo(m);
  memprof::register_untraced(m);
}

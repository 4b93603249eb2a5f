// Exports the constants and record layouts of events.h to Python (memprof/record/events.py
// reads them: C++ is the one place they are defined).
#include <c10/core/DeviceType.h>
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "events.h"

namespace py = pybind11;

namespace memprof {
namespace {

template <typename Record, size_t N>
py::dict layout(const std::array<FieldLayout, N>& fields) {
  py::list out;
  for (const FieldLayout& f : fields) {
    out.append(py::make_tuple(f.name, f.offset, f.format, f.size));
  }
  py::dict d;
  d["fields"] = out;
  d["itemsize"] = sizeof(Record);
  return d;
}

}  // namespace

void register_events(py::module_& m) {
  py::tuple phases(kPhaseNames.size());  // indexed by phase value
  for (size_t i = 0; i < kPhaseNames.size(); ++i) phases[i] = kPhaseNames[i];
  m.attr("PHASES") = phases;
  m.attr("PHASE_OTHER") = static_cast<int>(kPhaseOther);
  m.attr("PHASE_FORWARD") = static_cast<int>(kPhaseForward);
  m.attr("PHASE_BACKWARD") = static_cast<int>(kPhaseBackward);
  m.attr("PHASE_OPTIMIZER") = static_cast<int>(kPhaseOptimizer);
  m.attr("KIND_MEMORY") = kKindMemory;
  m.attr("KIND_OUT_OF_MEMORY") = kKindOutOfMemory;
  m.attr("KIND_MARK") = kKindMark;
  m.attr("DEVICE_CPU") = static_cast<int>(c10::DeviceType::CPU);
  m.attr("DEVICE_CUDA") = static_cast<int>(c10::DeviceType::CUDA);
  m.def("event_layout", []() { return layout<Event>(kEventLayout); },
        "The Event record: {'fields': [(name, byte offset, numpy format, size)], 'itemsize'}.");
  m.def("seq_layout", []() { return layout<SeqRecord>(kSeqRecordLayout); },
        "The record seq_records() returns, in the same form as event_layout().");
}

}  // namespace memprof

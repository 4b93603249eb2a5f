"""The native event record layout, mirrored for numpy (csrc/events.h is the source of truth)."""
import numpy as np

EVENT_DTYPE = np.dtype([
    ("t_ns", "<i8"), ("ptr", "<u8"), ("size", "<i8"),
    ("total_allocated", "<i8"), ("total_reserved", "<i8"), ("seq", "<i8"),
    ("op", "<i4"), ("leaf_op", "<i4"), ("node", "<i4"), ("module", "<i4"),
    ("step", "<i4"), ("thread", "<i4"),
    ("device_type", "i1"), ("device_index", "i1"), ("phase", "i1"), ("kind", "i1"),
    ("reserved_pad", "<i4"),
])
assert EVENT_DTYPE.itemsize == 80

SEQ_DTYPE = np.dtype([("seq", "<i8"), ("op", "<i4"), ("module", "<i4"),
                      ("thread", "<i4"), ("pad", "<i4")])

PHASES = ("other", "forward", "backward", "optimizer")
PHASE_OTHER, PHASE_FORWARD, PHASE_BACKWARD, PHASE_OPTIMIZER = range(4)
KIND_MEMORY, KIND_OUT_OF_MEMORY, KIND_MARK = 0, 1, 2
DEVICE_CPU, DEVICE_CUDA = 0, 1  # c10::DeviceType values

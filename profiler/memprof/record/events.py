"""The native record layouts and the constants shared with C++, read from memprof._C.

csrc/events.h defines them once; the extension reports each record's fields (name, byte
offset, numpy format, size: computed there with offsetof/sizeof) and this module builds the
numpy dtypes from that report, checking at import that they tile the records exactly.
"""
import numpy as np

from .. import _C

_REBUILD = "rebuild the extension: pip install --no-build-isolation --no-deps -e ."


def _record_dtype(record: str, layout_fn: str) -> np.dtype:
    """The numpy dtype of one native record, checked against the sizes C++ reported."""
    if not hasattr(_C, layout_fn):
        raise ImportError(f"memprof._C has no {layout_fn}(): the extension is older than "
                          f"memprof.record.events; {_REBUILD}")
    layout = getattr(_C, layout_fn)()
    fields, itemsize = layout["fields"], layout["itemsize"]
    try:
        dtype = np.dtype({"names": [f[0] for f in fields], "formats": [f[2] for f in fields],
                          "offsets": [f[1] for f in fields], "itemsize": itemsize})
    except (TypeError, ValueError) as exc:
        raise ImportError(f"memprof._C {record} layout is not a numpy dtype: {exc} "
                          f"({_REBUILD})") from None
    problems, end = [], 0
    for name, offset, fmt, size in sorted(fields, key=lambda f: f[1]):
        if dtype.fields[name][0].itemsize != size:
            problems.append(f"{name}: numpy {fmt!r} is {dtype.fields[name][0].itemsize} bytes, "
                            f"C++ says {size}")
        if offset != end:  # a gap would be dropped by np.concatenate, an overlap is corrupt
            problems.append(f"{name} at byte {offset}, expected {end}")
        end = offset + size
    if end != itemsize:
        problems.append(f"fields end at byte {end}, the record is {itemsize} bytes")
    if problems:
        raise ImportError(f"memprof._C {record} layout does not match its numpy dtype: "
                          + "; ".join(problems) + f" ({_REBUILD})")
    return dtype


EVENT_DTYPE = _record_dtype("Event", "event_layout")  # one allocation, free, OOM or marker
SEQ_DTYPE = _record_dtype("SeqRecord", "seq_layout")  # forward op by autograd sequence number

PHASES = tuple(_C.PHASES)  # names, indexed by phase value
PHASE_OTHER, PHASE_FORWARD, PHASE_BACKWARD, PHASE_OPTIMIZER = (
    _C.PHASE_OTHER, _C.PHASE_FORWARD, _C.PHASE_BACKWARD, _C.PHASE_OPTIMIZER)
KIND_MEMORY, KIND_OUT_OF_MEMORY, KIND_MARK = _C.KIND_MEMORY, _C.KIND_OUT_OF_MEMORY, _C.KIND_MARK
DEVICE_CPU, DEVICE_CUDA = _C.DEVICE_CPU, _C.DEVICE_CUDA  # c10::DeviceType values

# Categories of memory, assigned by profile.py from phases and the recorders' snapshots.
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "other",
              "communication", "buffers", "recomputed_weights")
CAT_PARAMETERS, CAT_GRADIENTS, CAT_OPTIMIZER_STATE, CAT_ACTIVATIONS, CAT_TEMPORARIES, CAT_OTHER = \
    range(6)
# buffers handed to torch.distributed collectives: DDP's gradient buckets, FSDP's all-gathered
# parameters and reduce-scatter buffers (record.distributed)
CAT_COMMUNICATION = CATEGORIES.index("communication")
# module buffers (BatchNorm running statistics, position ids, rotary / positional tables),
# attributed to the module that registered them (record.snapshots)
CAT_BUFFERS = CATEGORIES.index("buffers")
# the weight an old-style weight_norm / spectral_norm pre-hook recomputes at each forward and
# keeps on its module: derived from the parameters, one per module, the same at any batch
# (record.recomputed_weights) - not activations, and never scaled with the batch
CAT_RECOMPUTED_WEIGHTS = CATEGORIES.index("recomputed_weights")
PREEXISTING_THREAD = -1  # thread of a synthetic allocation for a block that existed before tracking
FAKE_DEVICE_TYPE = DEVICE_CUDA  # storages of fake tensors stand for the GPU an estimate models

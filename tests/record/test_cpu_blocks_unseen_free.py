"""A block PyTorch's default CPU allocator reported (torch.UntypedStorage(n): a deep copy of a
state dict, torch.load) and a thread freed where memprof has no hook (one that existed before
the block and never ran an op there) stays noted in memprof's CPU size table: that free is
not seen. With FLAGS_caffe2_report_cpu_memory_usage set, PyTorch notes the size of every
block itself and reports its free to memprof's hook, also of a block memprof never saw made:
one made on that thread at the stale block's address. Its free took the stale size - the
running total fell by the old block's 300,000 bytes where the free said 299,500, and the log
paired the free with the old allocation, 500 bytes alive for good. The stale block's free is
recorded first, with its own size, and this free stays a block memprof did not see made."""
import json
import os
import subprocess
import sys

import pytest

N, M = 300_000, 299_500    # one mapping's pages each: the kernel gives the address back

SCRIPT = r"""
import ctypes, gc, json, os, queue, sys, threading
import torch, memprof
N, M = int(sys.argv[1]), int(sys.argv[2])
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
flag = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage")
jobs, done = queue.Queue(), queue.Queue()

def worker():                       # started before the block; never runs an op
    for job in iter(jobs.get, None):
        done.put(job())

def on_worker(job):
    jobs.put(job)
    return done.get()

thread = threading.Thread(target=worker)
thread.start()
box = {}
flag.value = True
try:
    gc.collect()
    with memprof.track() as prof:
        box["old"] = torch.UntypedStorage(N)             # reported to memprof's hook
        address = box["old"].data_ptr()
        on_worker(lambda: box.pop("old") and None)        # its free: no hook there
        on_worker(lambda: box.__setitem__("new", torch.UntypedStorage(M)))   # unseen
        reused = box["new"].data_ptr() == address
        del box["new"]                                    # reported: PyTorch knows its size
finally:
    flag.value = False
    jobs.put(None)
    thread.join()
mem = prof.memory
at = mem["ptr"] == address
print(json.dumps({"reused": reused, "size": mem["size"][at].tolist(),
                  "total": mem["total_allocated"][at].tolist(),
                  "live": int(prof.effective_size[at].sum())}))
"""


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    script = tmp_path_factory.mktemp("unseen") / "unseen_free.py"
    script.write_text(SCRIPT)
    # mmap for both blocks (no dynamic threshold): a freed block's pages come back at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(script), str(N), str(M)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if not found["reused"]:
        pytest.skip("the C library did not give the freed block's address to the next one")
    return found


def test_a_free_of_a_block_never_seen_made_does_not_take_a_stale_size(events):
    sizes, totals = events["size"], events["total"]
    assert sizes == [N, -N, -M], events
    # the stale block leaves the total with its own size; the unseen one moves nothing
    assert totals[1] == totals[0] - N and totals[2] == totals[1]


def test_the_log_frees_the_stale_block_whole(events):
    assert events["live"] == 0, events

"""Replay speed of the native CUDA caching-allocator model (memprof._C.simulate_allocator).

Two synthetic streams, generated vectorized with numpy (seeded, reproducible):

* transformer: a GPT-like training loop (12 layers, hidden 768, 12 heads, batch 8, vocab 32000)
  with a variable sequence length per step (384..512 tokens, as with length-bucketed batches,
  the classic source of fragmentation): parameters and Adam state allocated once; per step
  the forward allocates the saved activations layer by layer with short-lived temporaries
  (LIFO), the backward frees them in reverse while allocating gradients and temporaries, the
  optimizer allocates and frees per-parameter temporaries, zero_grad frees the gradients.
* random: log-uniform sizes from 512 B to 64 MiB, each freed after a random lifetime
  (mean 2000 events): thousands of live and cached blocks, a stress test for the free-block
  index rather than a realistic workload.

For each stream and mode (default, expandable_segments, and a tight capacity: the smallest
multiple of 64 MiB found by bisection with which the default replay does not run out of
memory, so that the allocator flushes its cache and retries) the replay is timed (median of --repeat runs) as
events / second of the native call, plus the end-to-end time of memprof.plan.allocator.simulate.

    python benchmarks/allocator_replay.py [--events 10000000] [--repeat 3]

Prints a table and writes benchmarks/results/allocator_replay.{txt,json}.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import numpy as np

from _results import machine, save

MiB = 1 << 20


# ------------------------------------------------------------------------------ streams
class _Template:
    """One training step as (local id, coefficient, power of the sequence length) events."""

    def __init__(self):
        self.local, self.coef, self.power, self.is_free = [], [], [], []
        self.n_ids = 0
        self.meta = {}

    def alloc(self, coef: int, power: int = 1) -> int:
        i = self.n_ids
        self.n_ids += 1
        self.meta[i] = (coef, power)
        self.local.append(i)
        self.coef.append(coef)
        self.power.append(power)
        self.is_free.append(False)
        return i

    def free(self, i: int) -> None:
        coef, power = self.meta[i]
        self.local.append(i)
        self.coef.append(coef)
        self.power.append(power)
        self.is_free.append(True)


def transformer_stream(n_events: int, seed: int = 0):
    """Event arrays (ptr uint64, size int64) of a GPT-like training loop; see module doc."""
    rng = np.random.default_rng(seed)
    L, H, heads, B, V = 12, 768, 12, 8, 32000
    f4 = 4  # fp32 bytes
    params = []  # (name, bytes)
    params.append(V * H * f4)                      # token embedding (tied head)
    params.append(1024 * H * f4)                   # position embedding
    for _ in range(L):
        params += [H * f4, H * f4, 3 * H * H * f4, 3 * H * f4, H * H * f4, H * f4,
                   H * f4, H * f4, 4 * H * H * f4, 4 * H * f4, 4 * H * H * f4, H * f4]
    params += [H * f4, H * f4]

    # prologue: parameters, then Adam exp_avg / exp_avg_sq (persistent)
    pro_size = []
    for _ in range(3):
        pro_size += params
    pro_ptr = np.arange(1, len(pro_size) + 1, dtype=np.uint64)

    t = _Template()
    tok = B * f4  # bytes per token of a [B, S] fp32 tensor (times features below)
    # forward
    saved = []
    x = t.alloc(tok * H)  # embedding output
    saved.append(x)
    for _ in range(L):
        for feat in (H,):               # layer norm 1: out + mean + rstd
            saved += [t.alloc(tok * feat), t.alloc(tok), t.alloc(tok)]
        saved.append(t.alloc(tok * 3 * H))          # qkv
        tmp = t.alloc(tok * H)                      # q transpose copy
        saved.append(t.alloc(B * heads * f4, 2))    # scores [B, h, S, S]
        t.free(tmp)
        saved.append(t.alloc(B * heads * f4, 2))    # softmax probs
        saved.append(t.alloc(B * heads, 2))         # dropout mask (bool)
        saved.append(t.alloc(tok * H))              # attention output
        saved.append(t.alloc(tok * H))              # projection
        saved.append(t.alloc(tok * H))              # residual
        saved += [t.alloc(tok * H), t.alloc(tok), t.alloc(tok)]  # layer norm 2
        saved.append(t.alloc(tok * 4 * H))          # fc1
        saved.append(t.alloc(tok * 4 * H))          # gelu
        saved.append(t.alloc(tok * H))              # fc2
        saved.append(t.alloc(tok * H))              # residual
        for small in (512, 2048, 8192):             # scalars / reductions
            t.free(t.alloc(small, 0))
    logits = t.alloc(tok * V)
    lsm = t.alloc(tok * V)                          # log-softmax
    loss = t.alloc(4, 0)
    # backward
    grads = {}
    g_logits = t.alloc(tok * V)
    t.free(lsm)
    t.free(logits)
    g = t.alloc(tok * H)
    t.free(g_logits)
    grads[0] = t.alloc(params[0], 0)
    pi = len(params) - 3
    for _ in range(L):
        # walk the layer's saved tensors backwards: a gradient per tensor, then free it
        for _k in range(17):
            s = saved.pop()
            coef, power = t.meta[s]
            gi = t.alloc(coef, power)
            tmp = t.alloc(coef, power) if power == 2 else None
            t.free(g)
            g = gi
            if tmp is not None:
                t.free(tmp)
            t.free(s)
        for k in range(12):                           # parameter gradients of the layer
            grads[pi - k] = t.alloc(params[pi - k], 0)
            t.free(t.alloc(512, 0))                   # reduction scalar
        pi -= 12
    t.free(g)
    t.free(saved.pop())
    t.free(loss)
    for i in range(len(params)):
        if i not in grads:
            grads[i] = t.alloc(params[i], 0)
    # Adam (foreach): temporaries per parameter, freed in groups
    order = sorted(grads)
    for c in range(0, len(order), 16):
        group = order[c:c + 16]
        tmps = [t.alloc(params[i], 0) for i in group]
        tmps2 = [t.alloc(params[i], 0) for i in group]
        for x in tmps2[::-1]:
            t.free(x)
        for x in tmps[::-1]:
            t.free(x)
    for i in order:                                   # zero_grad(set_to_none=True)
        t.free(grads[i])

    local = np.array(t.local, dtype=np.int64)
    coef = np.array(t.coef, dtype=np.int64)
    power = np.array(t.power, dtype=np.int64)
    sign = np.where(np.array(t.is_free), -1, 1).astype(np.int64)
    T = len(local)
    steps = max(1, (n_events - len(pro_size) + T - 1) // T)
    seq = rng.choice(np.arange(384, 513, 32), size=steps).astype(np.int64)  # per-step length
    sizes = coef[None, :] * seq[:, None] ** power[None, :] * sign[None, :]
    ptrs = ((np.arange(steps, dtype=np.uint64)[:, None] + np.uint64(1)) << np.uint64(24)) \
        + local.astype(np.uint64)[None, :]
    ptr = np.concatenate([pro_ptr, ptrs.ravel()])[:n_events]
    size = np.concatenate([np.array(pro_size, dtype=np.int64), sizes.ravel()])[:n_events]
    return ptr, size, {"events_per_step": T, "steps": int(steps),
                       "model": f"GPT-like L={L} H={H} heads={heads} B={B} V={V}, "
                                "seq 384..512 per step"}


def random_stream(n_events: int, seed: int = 1, mean_life: float = 2000.0):
    """Log-uniform sizes 512 B..64 MiB, each freed after a geometric lifetime."""
    rng = np.random.default_rng(seed)
    n = n_events // 2
    size = np.exp(rng.uniform(np.log(512), np.log(64 * MiB), n)).astype(np.int64)
    t_alloc = np.arange(n, dtype=np.float64)
    t_free = t_alloc + rng.geometric(1.0 / mean_life, n) + 0.5
    t = np.concatenate([t_alloc, t_free])
    order = np.argsort(t, kind="stable")
    ids = np.arange(1, n + 1, dtype=np.uint64)
    ptr = np.concatenate([ids, ids])[order]
    sz = np.concatenate([size, -size])[order]
    return ptr, sz, {"mean_lifetime_events": mean_life}


# ------------------------------------------------------------------------------ timing
def _median_time(fn, repeat: int) -> tuple[float, float, object]:
    """After one warm-up run: median wall seconds, median CPU seconds of this thread (the replay runs in the calling
    thread with the GIL released, so thread CPU time excludes time lost to other processes)."""
    walls, cpus, out = [], [], fn()  # one untimed warm-up run
    for _ in range(repeat):
        c0, t0 = time.thread_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.thread_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def _tight_capacity(C, ptr, size, step: int = 64 * MiB) -> int:
    """Smallest multiple of `step` (bisection) with which the replay does not run out."""
    base = C.simulate_allocator(ptr, size, return_timeline=False)
    lo = base["peak_allocated"] // step          # lo * step: not enough (or barely)
    hi = -(-base["peak_reserved"] // step)       # hi * step: enough (unlimited never exceeds)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        d = C.simulate_allocator(ptr, size, capacity=mid * step, return_timeline=False)
        if d["oom"]:
            lo = mid
        else:
            hi = mid
    return hi * step


def _machine() -> dict:
    return machine(numpy=np.__version__, usable_cores=len(os.sched_getaffinity(0)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "allocator_replay"))
    args = ap.parse_args(argv)

    import torch  # noqa: F401
    from memprof import _C
    from memprof.plan.allocator import simulate

    load_at_start = os.getloadavg()[0]
    streams = {}
    t0 = time.perf_counter()
    streams["transformer"] = transformer_stream(args.events)
    streams["random"] = random_stream(args.events)
    gen_s = time.perf_counter() - t0

    rows = []
    for name, (ptr, size, info) in streams.items():
        cap = _tight_capacity(_C, ptr, size)
        modes = [("default", {}), ("expandable", {"expandable_segments": True}),
                 (f"capacity {cap / MiB:.0f} MiB (tight)", {"capacity": cap})]
        for mode, kw in modes:
            for timeline in (False, True):
                secs, cpu, d = _median_time(
                    lambda: _C.simulate_allocator(ptr, size, return_timeline=timeline, **kw),
                    args.repeat)
                rows.append({
                    "stream": name, "mode": mode, "timeline": timeline,
                    "events": int(len(ptr)), "replayed": int(d["events_replayed"]),
                    "seconds": secs, "events_per_s": d["events_replayed"] / secs,
                    "cpu_seconds": cpu, "events_per_cpu_s": d["events_replayed"] / cpu,
                    "peak_reserved_MiB": d["peak_reserved"] / MiB,
                    "peak_allocated_MiB": d["peak_allocated"] / MiB,
                    "frag_at_peak": d["fragmentation_at_peak"],
                    "cuda_mallocs": d["num_device_alloc"], "oom": bool(d["oom"]),
                    "cache_flushes": d["num_alloc_retries"],
                    "stream_info": info,
                })
        secs, cpu, _ = _median_time(lambda: simulate((ptr, size)), args.repeat)
        rows.append({"stream": name, "mode": "default, simulate((ptr, size))",
                     "timeline": True, "events": int(len(ptr)), "replayed": int(len(ptr)),
                     "seconds": secs, "events_per_s": len(ptr) / secs, "cpu_seconds": cpu,
                     "events_per_cpu_s": len(ptr) / cpu, "stream_info": info})
        if name == "transformer":  # the profiler's 72-byte records, fields read in place
            from memprof.record.events import EVENT_DTYPE
            ev = np.zeros(len(ptr), dtype=EVENT_DTYPE)
            ev["ptr"], ev["size"] = ptr, size
            secs, cpu, _ = _median_time(lambda: simulate(ev), args.repeat)
            rows.append({"stream": name, "mode": "default, simulate(EVENT_DTYPE array)",
                         "timeline": True, "events": int(len(ptr)), "replayed": int(len(ptr)),
                         "seconds": secs, "events_per_s": len(ptr) / secs, "cpu_seconds": cpu,
                         "events_per_cpu_s": len(ptr) / cpu, "stream_info": info})
            del ev

    machine_info = _machine()
    machine_info["load_average_at_start"] = load_at_start
    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    lines = [f"memprof allocator replay benchmark  ({time.strftime('%Y-%m-%d %H:%M:%S')})",
             f"command: python {cmd}",
             f"machine: {machine_info['cpu']}, {machine_info['cpus']} cores "
             f"({machine_info['usable_cores']} usable), {machine_info['platform']}, "
             f"Python {machine_info['python']}, numpy {machine_info['numpy']}, "
             f"commit {machine_info['git_commit']}",
             f"timing: median of {args.repeat} runs after a warm-up run, single thread; 'M events/s' = events / "
             "wall seconds, 'M ev/cpu-s' = events / CPU seconds of the replaying thread "
             f"(insensitive to other load); stream generation took {gen_s:.1f} s; "
             f"load average at start {load_at_start:.2f}",
             ""]
    hdr = (f"{'stream':<12} {'mode':<40} {'timeline':>8} {'events':>11} {'seconds':>8} "
           f"{'M events/s':>10} {'M ev/cpu-s':>10} {'peak res MiB':>12} {'frag@peak':>9} {'mallocs':>7} "
           f"{'flushes':>7}")
    lines += [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(
            f"{r['stream']:<12} {r['mode']:<40} {str(r['timeline']):>8} {r['replayed']:>11,} "
            f"{r['seconds']:>8.3f} {r['events_per_s'] / 1e6:>10.1f} "
            f"{r['events_per_cpu_s'] / 1e6:>10.1f} "
            + (f"{r['peak_reserved_MiB']:>12.0f} {r['frag_at_peak']:>9.3f} "
               f"{r['cuda_mallocs']:>7} {r['cache_flushes']:>7}"
               if "peak_reserved_MiB" in r else ""))
    for name, (_, _, info) in streams.items():
        lines.append(f"{name}: {info}")
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"command": f"python {cmd}", "machine": machine_info,
                          "repeat": args.repeat, "generation_seconds": gen_s, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

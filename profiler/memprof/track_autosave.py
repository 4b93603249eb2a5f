"""The profile saved while the block still runs, so that a run the kernel kills still leaves
one: the OOM killer's SIGKILL (exit status 137, the host's or the container's memory gone -
nothing in the process runs after it), a scheduler's `kill -9`, a native crash. No exit path
can save then; a file written earlier can.

At a step end, once the save is due, what was recorded so far is copied (the native log goes
on recording), assembled and analysed as at the block's end (the leak check with the live
objects of that moment) and written atomically to the block's path, marked partial
(`meta["partial"]`: the steps ended and the time it was saved at). The block's own save at its
end replaces it. A save costs time in the step it runs in (the throughput tables leave it
out, as the leak probe's looks; 0.25 s for 300k events, 1.1 s for 1.5M on this 2-core machine:
benchmarks/autosave_cost.py) and three to four times the events' bytes of memory while it
runs: the next save waits at least `SPACING_FACTOR` times as long as the last one took, and a
save is skipped while the host (or the container's memory limit) leaves too little room for
it - a process near its OOM kill would be pushed over by it.

Saves fall due on the wall clock's multiples of `every` seconds, not on each process's own
count: the ranks of a job, started together, save at about the same step, and a rank that saves
does not hold the others at the next collective one interval after another.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time

from . import _C
from . import analyse as _analyse
from .profile import Profile
from .profile_file import remove_stale_temporaries
from .record.events import EVENT_DTYPE
from .run import Run

#: the default spacing of saves (memprof.track(autosave=...), `memprof run --autosave`)
DEFAULT_AUTOSAVE_S = 60.0
#: the next save waits at least this many times the last one's duration: saves stay under
#: ~2 % of the run's time however large the profile grows
SPACING_FACTOR = 50
#: a save needs about this many times the events' bytes while it runs (the copy put in time
#: order, the profile's columns, the merged stream the file holds): 3.5x measured on 1.5M events
MEMORY_FACTOR = 4
#: where the kernel mounts the cgroup hierarchy
CGROUP_ROOT = "/sys/fs/cgroup"


def available_memory() -> int | None:
    """Bytes this process can still take before an OOM kill: the host's MemAvailable, or
    less where a cgroup's memory limit (a container, a Slurm job) leaves less; None where
    neither is known."""
    found = [b for b in (_meminfo_available(), cgroup_headroom()) if b is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_headroom(proc_cgroup: str = "/proc/self/cgroup",
                    root: str = CGROUP_ROOT) -> int | None:
    """The least room left under the memory limits of this process's cgroup and its parents:
    limit - (usage - inactive file cache), the working set as the kubelet counts it (usage
    counts page cache the kernel reclaims before it kills: a job that reads its data or writes
    checkpoints sits near its limit by that count alone). cgroup v2: memory.max,
    memory.current, memory.stat's inactive_file; v1: its memory hierarchy's limit_in_bytes,
    usage_in_bytes, memory.stat's total_inactive_file. None where no limit is set or readable."""
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    rooms = []
    for parts in lines:
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":   # v2: the unified hierarchy
            rooms += [_room(here, "memory.max", "memory.current", "inactive_file")
                      for here in _levels(root, path)]
        elif "memory" in controllers.split(","):   # v1: the memory controller's hierarchy
            rooms += [_room(here, "memory.limit_in_bytes", "memory.usage_in_bytes",
                            "total_inactive_file")
                      for here in _levels(os.path.join(root, "memory"), path)]
    rooms = [r for r in rooms if r is not None]
    return min(rooms) if rooms else None


def _levels(mount: str, path: str) -> list[str]:
    """The directories of a cgroup and each parent up to the mount. A path that is not there
    (a container without its own cgroup namespace names the host's path, and sees its own
    cgroup mounted at the root) is the mount itself."""
    parts = [p for p in path.strip("/").split("/") if p]
    if not os.path.isdir(os.path.join(mount, *parts)):
        parts = []
    return [os.path.join(mount, *parts[:depth]) for depth in range(len(parts), -1, -1)]


def _room(here: str, limit_name: str, usage_name: str, inactive_key: str) -> int | None:
    try:
        with open(os.path.join(here, limit_name), encoding="ascii") as f:
            limit = f.read().strip()
        with open(os.path.join(here, usage_name), encoding="ascii") as f:
            usage = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if not limit.isascii() or not limit.isdigit() or int(limit) >= 1 << 62:  # "max"; v1's none
        return None
    inactive = 0
    try:
        with open(os.path.join(here, "memory.stat"), encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
                    break
    except (OSError, ValueError):
        pass
    return max(0, int(limit) - max(0, usage - inactive))


def next_due(due: float, now: float, every: float, took: float) -> float:
    """When the save after one due at `due` (a multiple of `every`), made at `now` and taking
    `took` seconds, falls due: the multiple `every` after it - or as many multiples as
    SPACING_FACTOR x `took` needs - whatever the save's own delay past its multiple, so that
    processes that saved at one multiple save at the same next one; never one already past."""
    gap = max(every, SPACING_FACTOR * took)
    nxt = due + math.ceil(gap / every - 1e-9) * every
    if nxt <= now:   # the step ends were farther apart than the interval
        nxt = (math.floor(now / every) + 1) * every
    return nxt


def save_where_possible(profile, target: str) -> tuple[str | None, str | None]:
    """(the path written, why not `target`): `profile` at `target`, else in the temporary
    directory (`memprof-<pid>-<name>`: the same for every save of a block), where the path
    cannot take it (the directory went away, the disk filled): a run's profile was lost after
    the whole run. (None, why) where neither could be written."""
    try:
        return profile.save(target), None
    except (OSError, ValueError) as err:   # (UnwritablePath: the path's problem, said once)
        why = getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err)
    fallback = os.path.join(tempfile.gettempdir(),
                            f"memprof-{os.getpid()}-{os.path.basename(target)}")
    try:
        return profile.save(fallback), why
    except (OSError, ValueError):
        return None, why


class Autosave:
    """Saves the tracker's profile so far at step ends, every `every` seconds at most."""

    def __init__(self, tracker, every: float):
        self.tracker = tracker
        self.every = float(every)
        self.saves: list[list] = []   # [steps ended, seconds] per save
        self.skipped: dict[str, str] = {}   # why a due save was not made: the last, per kind
        # the first multiple of `every` on the wall clock at least `every` after the start
        self._due = math.ceil((time.time() + self.every) / self.every) * self.every
        # the same on the monotonic clock, one interval later: a wall clock stepped back (NTP,
        # a VM resumed) does not stop the saves
        self._due_anyway = time.monotonic() + 2 * self.every
        self._saving = False
        self.elsewhere: str | None = None   # where saves went that the path could not take

    def install(self, session) -> None:
        # a process killed while it wrote left its temporary file: gone once nothing writes it
        try:
            remove_stale_temporaries(self.tracker.target(self.tracker.identity()))
        except Exception:  # noqa: BLE001  (tidying up must not stop the block)
            pass
        session.steps.on_step_end.append(self._step_end)

    def remove(self, session) -> None:
        if self._step_end in session.steps.on_step_end:
            session.steps.on_step_end.remove(self._step_end)

    def _step_end(self) -> None:
        if self._saving or (time.time() < self._due and time.monotonic() < self._due_anyway):
            return   # (a step end inside a save: not again)
        self._saving = True
        first = not self.saves
        t0 = time.monotonic()
        try:
            self.save_now()
        except Exception as err:  # noqa: BLE001  (a save must never break training)
            self.skipped["error"] = f"{type(err).__name__}: {err}"
        finally:
            # (the first save's time is mostly one-off: the analyses' imports and caches; a
            # failed one waits as a made one does, not every interval again)
            took = 0.0 if first and self.saves else time.monotonic() - t0
            now = time.time()
            self._due = next_due(self._due, now, self.every, took)
            self._due_anyway = time.monotonic() + (self._due - now) + self.every
            self._saving = False

    def save_now(self) -> str | None:
        """Write the profile so far; where it went (None: skipped, reason in `skipped`)."""
        session = self.tracker.session
        need = MEMORY_FACTOR * int(_C.counters()["records"]) * EVENT_DTYPE.itemsize
        free = available_memory()
        if free is not None and need > free:
            self.skipped["memory"] = (f"{free >> 20} MiB available, a save needs about "
                                      f"{need >> 20} MiB")
            return None
        t0 = time.perf_counter()
        profile = Profile(Run.from_session(session.so_far()))
        steps = session.steps.step
        profile.run.meta["partial"] = {
            "steps_ended": steps, "saved_at_unix": round(time.time(), 3),
            "elapsed_s": round(time.monotonic() - self.tracker.started, 3)}
        self.tracker.note_rank(profile)
        profile.run.records["autosave"] = self.record()
        _analyse.analyse(profile, self.tracker.analyses)
        target = self.tracker.target(profile.meta)
        written, why = save_where_possible(profile, target)
        if written is None:
            raise OSError(f"{target}: {why}")
        if why is not None:
            if self.elsewhere is None:   # said once: the next saves go there too
                print(f"memprof: could not save the profile so far to {target} ({why}); "
                      f"saving it to {written} until the path takes it again",
                      file=sys.stderr, flush=True)
            self.elsewhere = written
        target = written
        # the time this step spent saving: the throughput tables leave it out
        self.saves.append([steps, round(time.perf_counter() - t0, 6)])
        return target

    def record(self) -> dict:
        return {"every_s": self.every, "saves": [list(x) for x in self.saves],
                "skipped": list(self.skipped.values())}

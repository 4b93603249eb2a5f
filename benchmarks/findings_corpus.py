"""The findings corpus (tests/corpus, issue 18): every loop run under memprof, with what it
should give, what it gave, the holder, the bytes and the time memprof took to check it
(leak_check_s: the retained-graph check, the one analysis that walks live objects).

    python benchmarks/findings_corpus.py
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "corpus"))

from _results import command, machine, save  # noqa: E402
from corpus_cases import BUGGY, CORRECT, TIMING_KINDS, run, short_holder  # noqa: E402


def check(case) -> dict:
    t0 = time.perf_counter()
    prof, pinned = run(case)
    wall = time.perf_counter() - t0
    found = list(prof.findings)
    timing = [f.kind for f in prof.findings if f.kind in TIMING_KINDS]
    first = found[0] if found else None
    if case.buggy:
        ok = ([f.kind for f in found] == [case.kind] and
              (case.holder is None or (short_holder(first.holder)[0] == case.holder and
                                       abs(first.bytes - pinned) <= 0.1 * pinned)))
    else:
        ok = not found
    check_s = sum(v for k, v in prof.meta.items() if k.endswith("_check_s"))
    return {"loop": case.name, "source": case.source, "expected": case.kind or "-",
            "found": ",".join(f.kind for f in found) or "-",
            "holder": ",".join(short_holder(first.holder)) if first and first.holder else "-",
            "bytes": first.bytes if first else 0, "expected_bytes": pinned,
            "timing_findings": ",".join(timing) or "-", "ok": ok,
            "leak_check_s": round(check_s, 3), "run_s": round(wall, 2)}


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)     # as tests/corpus runs them: tiny loops, one intra-op thread
    rows = [check(c) for c in CORRECT + BUGGY]
    head = ("loop", "expected", "found", "holder", "bytes", "expected_bytes", "ok",
            "leak_check_s", "run_s", "timing_findings")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in head]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(str(r[h]).ljust(w) for h, w in zip(head, widths)) for r in rows]
    good = sum(r["ok"] for r in rows)
    lines.append(f"\n{good} of {len(rows)} as expected ({len(CORRECT)} correct loops: no "
                 f"finding; {len(BUGGY)} buggy loops: exactly the expected finding, holder, bytes "
                 "within 10 %). leak_check_s: memprof's retained-graph check; run_s: the whole "
                 "tracked loop and its analysis; timing_findings: those of the findings that "
                 "come from wall-clock timing.")
    text = "\n".join(lines)
    text += f"\nmachine: {machine()}\ncommand: {command()}"
    print(text)
    save(os.path.join(HERE, "results", "findings_corpus"), text,
         {"rows": rows, "machine": machine(), "command": command()})


if __name__ == "__main__":
    main()

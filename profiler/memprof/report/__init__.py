"""Reports: consumers of profiles and plans, behind one interface.

    show(obj, console=None, **options)   terminal: a Profile's report or a Plan's table
    describe(profile, html=False)        a REPL's one line, a notebook's HTML (inline.py)
    export(obj, path)                    by extension. A Profile: .json Chrome/Perfetto trace
                                         (trace.py), .pickle PyTorch memory snapshot
                                         (snapshot.py), .html report (html.py). A Plan: .html
                                         (plan_html.py) or .json (Plan.to_json). A job's
                                         merged ranks (analyse.ranks.MergedRanks): .html
                                         (ranks_html.py) or .json (its summary)
Nothing below this package imports it; `memprof.show()` / `memprof.export()` are the way in.
"""
from __future__ import annotations


def show(obj, console=None, section: str | None = None, **options) -> None:
    """section (a Profile's): None = the whole report; 'diagnosis' = the out-of-memory
    diagnosis and what would fit; 'budget' = the budget replay (report/oom.py)."""
    from ..profile import Profile
    if isinstance(obj, Profile) and section is not None:
        from . import oom
        sections = {"diagnosis": oom.print_diagnosis, "budget": oom.print_budget}
        if section not in sections:
            raise ValueError(f"section={section!r}: expected one of {sorted(sections)}")
        sections[section](obj, console)
        return
    if isinstance(obj, Profile):
        from .terminal import print_report
        print_report(obj, console=console, **options)
        return
    from ..plan.search import Plan
    if isinstance(obj, Plan):
        from .plan import print_plan
        print_plan(obj, console=console, **options)
        return
    from ..analyse.ranks import MergedRanks
    if isinstance(obj, MergedRanks):
        from .ranks import print_ranks
        print_ranks(obj, console=console, **options)
        return
    raise TypeError(f"report: expected a memprof Profile, Plan or MergedRanks, got "
                    f"{type(obj).__name__}")


def describe(profile, html: bool = False) -> str:
    """A profile as a REPL shows it (one line) or, `html`, as a notebook does (report/inline.py;
    Profile.__repr__ and _repr_html_ come here)."""
    from .inline import html_fragment, one_line
    return html_fragment(profile) if html else one_line(profile)


#: the file names a profile exports to, by extension (_profile_export)
PROFILE_EXPORTS = (".json", ".pickle", ".pkl", ".html")


def _profile_export(profile, lower: str):
    if lower.endswith(".json"):
        import json
        from .trace import chrome_trace
        return json.dumps(chrome_trace(profile), separators=(",", ":"))
    if lower.endswith((".pickle", ".pkl")):
        import pickle
        from .snapshot import memory_snapshot
        return pickle.dumps(memory_snapshot(profile))
    if lower.endswith(".html"):
        from .html import html_report
        return html_report(profile)
    return None


def _plan_export(plan, lower: str):
    if lower.endswith(".json"):
        return plan.to_json()
    if lower.endswith(".html"):
        from .plan_html import plan_html
        return plan_html(plan)
    return None


def _ranks_export(merged, lower: str):
    if lower.endswith(".json"):
        import json
        return json.dumps(merged.summary(), indent=1, default=str)
    if lower.endswith(".html"):
        from .ranks_html import ranks_html
        return ranks_html(merged)
    return None


def export(obj, path: str) -> str:
    """Write `obj` (a Profile, a Plan or MergedRanks) to `path` in the format its extension
    names, atomically (a temporary file renamed over it); the path written is returned. A
    rank's profile of a job goes to `<name>.rank<R>.<ext>`, as Profile.save names it: every
    rank exporting `run.html` wrote one file, the last rank's."""
    from ..analyse.ranks import MergedRanks
    from ..plan.search import Plan
    from ..profile import Profile
    from ..profile_file import unwritable, write_atomically
    why = export_problem(str(path))
    if why is not None:   # before the work (a large HTML takes seconds), as the CLI checks
        raise ValueError(f"{path}: {why}")
    lower = str(path).lower()
    if isinstance(obj, Profile):
        data, known = _profile_export(obj, lower), ".json, .pickle or .html"
    elif isinstance(obj, Plan):
        data, known = _plan_export(obj, lower), ".html or .json"
    elif isinstance(obj, MergedRanks):
        data, known = _ranks_export(obj, lower), ".html or .json"
    else:
        raise TypeError(f"export: expected a memprof Profile, Plan or MergedRanks, got "
                        f"{type(obj).__name__}")
    if data is None:
        raise ValueError(f"{path}: unknown export format; expected a {known} file name")
    if isinstance(obj, Profile):
        path = _rank_export_path(obj, str(path))
        why = export_problem(path)
        if why is not None:
            raise ValueError(f"{path}: {why}")
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    return str(write_atomically(str(path), lambda f: f.write(raw)))


def export_problem(path: str) -> str | None:
    """Why an export could not be written at `path` (profile_file.unwritable), or would
    replace a profile: one saved under an export's name (`memprof report r.json --export
    r.json` replaced the profile with its own trace); None when it can be."""
    from ..profile_file import is_profile, unwritable
    why = unwritable(path)
    if why is None and is_profile(path):
        why = "is a memprof profile (it would be replaced by the export); give another file name"
    return why


def _rank_export_path(profile, path: str) -> str:
    """`run.html` -> `run.rank<R>.html` for a rank of a job of several ranks, exported inside
    that job (every rank writing one name); later, from a file (`memprof report
    run.rank0.memprof --export r.html`), the path as given."""
    import os
    from ..record.distributed import rank_path
    rank, world = profile.meta.get("rank"), profile.meta.get("world_size")
    # recorded in this process: a rank of the job (spawned ones, after destroy_process_group,
    # set no RANK); a file read back later is exported under the name given
    in_the_job = profile.meta.get("pid") == os.getpid()
    if in_the_job and rank is not None and world is not None and int(world) > 1:
        return rank_path(path, int(rank))
    return path

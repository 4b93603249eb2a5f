"""Reports: consumers of profiles and plans, behind one interface.

    show(obj, console=None, **options)   terminal: a Profile's report or a Plan's table
    export(obj, path)                    by extension: .json Chrome/Perfetto trace,
                                         .pickle PyTorch memory snapshot, .html report
Nothing below this package imports it; `memprof.show()` / `memprof.export()` are the way in.
"""
from __future__ import annotations


def show(obj, console=None, **options) -> None:
    from ..profile import Profile
    if isinstance(obj, Profile):
        from .terminal import print_report
        print_report(obj, console=console, **options)
        return
    from ..plan.search import Plan
    if isinstance(obj, Plan):
        from .plan import print_plan
        print_plan(obj, console=console, **options)
        return
    raise TypeError(f"report: expected a memprof Profile or Plan, got {type(obj).__name__}")


def export(obj, path: str) -> str:
    from .exports import export as export_profile
    return export_profile(obj, path)

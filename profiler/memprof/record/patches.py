"""The one place memprof replaces an attribute of torch, sys or a user's object while it records.

Every patch goes through a `PatchRegistry`: it remembers the original, and `restore()` puts
originals back in reverse order. Restoring is checked: when someone else replaced our wrapper
after us (a second profiler, a test's monkeypatch), the registry leaves their object in place
and says so, instead of silently dropping it; the wrapper then keeps passing through because
its owner has switched it off.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from . import torch_tables


@dataclass
class Patch:
    owner: Any
    name: str
    original: Any
    replacement: Any
    own: bool      # the attribute lived in owner.__dict__ (else it came from a class)


class PatchRegistry:
    def __init__(self):
        self._patches: list[Patch] = []
        self.notes: list[str] = []   # patches that could not be undone cleanly
        self._modules_before: set[str] = set()   # sys.modules' names at the first patch

    def patch(self, owner, name: str, make: Callable[[Any], Any]) -> Any:
        """Replace owner.name with make(original) and return the replacement. Works on
        modules, classes (their own attribute, so a staticmethod stays one) and instances
        (an instance attribute shadowing a method is removed again on restore)."""
        namespace = getattr(owner, "__dict__", {})
        own = name in namespace
        original = namespace[name] if own and isinstance(owner, type) else getattr(owner, name)
        if not self._patches:
            self._modules_before = set(sys.modules)
        replacement = make(original)
        setattr(owner, name, replacement)
        self._patches.append(Patch(owner, name, original, replacement, own))
        return replacement

    def set(self, owner, name: str, value) -> None:
        """Plain assignment that restore() undoes (sys.argv, a module's forward)."""
        self.patch(owner, name, lambda _original: value)

    def restore(self) -> None:
        """Undo every patch, newest first; one that fails does not stop the rest. torch's
        cached tables, and the modules first imported meanwhile (torch's and the user's), that
        took a wrapper while it was in place get the original back."""
        restored: dict[int, tuple[Any, Any]] = {}
        while self._patches:
            p = self._patches.pop()
            if not _in_place(p):
                self.notes.append(f"{_describe(p.owner)}.{p.name} was replaced again while "
                                  "memprof recorded: left as it is")
                continue
            if self._put_back(p) and callable(p.replacement) and \
                    p.replacement is not p.original:
                restored[id(p.replacement)] = (p.replacement, p.original)
        # every module first imported meanwhile: torch's, and a user's imported lazily inside
        # the loop (`from torch.autograd import grad` bound memprof's wrapper there)
        imported = [m for n, m in list(sys.modules.items()) if n not in self._modules_before] \
            if restored else []
        torch_tables.put_back(restored, imported)

    def undo(self, replacement) -> bool:
        """Put back now the original of the patch whose replacement this is (one needed for
        a while only: later calls pay no frame of it) -> whether it was put back. One
        replaced again since stays registered for restore(); its owner must then have
        switched it off."""
        for i in range(len(self._patches) - 1, -1, -1):
            p = self._patches[i]
            if p.replacement is replacement:
                if not _in_place(p):
                    return False
                del self._patches[i]
                if self._put_back(p) and callable(p.replacement):
                    torch_tables.put_back({id(p.replacement): (p.replacement, p.original)}, [])
                return True
        return False

    def _put_back(self, p: Patch) -> bool:
        """The original back on its owner -> whether it went back."""
        try:
            if p.own:
                setattr(p.owner, p.name, p.original)
            else:
                delattr(p.owner, p.name)
        except Exception as err:  # noqa: BLE001
            self.notes.append(f"{_describe(p.owner)}.{p.name}: could not restore "
                              f"({type(err).__name__}: {err})")
            return False
        return True

    def __len__(self) -> int:
        return len(self._patches)


def _in_place(p: Patch) -> bool:
    """Whether p's replacement is still what its owner holds (nobody replaced it since)."""
    namespace = getattr(p.owner, "__dict__", None)
    current = namespace.get(p.name) if namespace is not None else getattr(p.owner, p.name, None)
    return current is p.replacement


def _describe(owner) -> str:
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or \
        type(owner).__name__


def remove_handles(handles: list) -> None:
    """Remove hook handles; one that fails (its module is gone) does not stop the rest."""
    for h in handles:
        try:
            h.remove()
        except Exception:  # noqa: BLE001
            pass
    handles.clear()

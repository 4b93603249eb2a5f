"""The patch registry: every patch undone, checked, in reverse order."""
import sys
import types

import torch

import memprof
from memprof.record.patches import PatchRegistry


class Base:
    def f(self):
        return "base"

    @staticmethod
    def s():
        return "static"


class Child(Base):
    pass


def test_restore_undoes_module_class_and_instance_patches():
    mod = types.SimpleNamespace(x=1)
    obj = Child()
    reg = PatchRegistry()
    reg.set(mod, "x", 2)
    reg.patch(Base, "s", lambda orig: staticmethod(lambda: "patched " + orig.__func__()))
    reg.set(obj, "f", lambda: "instance")
    assert (mod.x, Child.s(), obj.f()) == (2, "patched static", "instance")
    reg.restore()
    assert (mod.x, Child.s(), obj.f()) == (1, "static", "base")
    assert "f" not in vars(obj)                # the instance attribute is gone again
    assert isinstance(vars(Base)["s"], staticmethod) and not reg.notes


def test_a_patch_replaced_by_someone_else_is_left_and_noted():
    mod = types.SimpleNamespace(x=1)
    reg = PatchRegistry()
    reg.set(mod, "x", 2)
    mod.x = 3                                   # another tool patched after us
    reg.restore()
    assert mod.x == 3 and "replaced again" in reg.notes[0]


def test_tracking_restores_everything_it_patched(mlp):
    before = (torch.autograd.backward, torch.nn.utils.clip_grad_norm_,
              torch.optim.lr_scheduler.LRScheduler.step, sys.argv, threading_profile())
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    try:
        with memprof.track(mlp, opt, health=True):
            assert torch.autograd.backward is not before[0]
            mlp(torch.randn(4, 64)).sum().backward()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    after = (torch.autograd.backward, torch.nn.utils.clip_grad_norm_,
             torch.optim.lr_scheduler.LRScheduler.step, sys.argv, threading_profile())
    assert after == before


def threading_profile():
    import threading
    return threading.getprofile()


def test_undo_puts_one_patch_back_now_and_leaves_one_replaced_since():
    mod = types.SimpleNamespace(x=1, y=1)
    reg = PatchRegistry()
    rx = reg.patch(mod, "x", lambda orig: [orig])
    ry = reg.patch(mod, "y", lambda orig: [orig])
    assert reg.undo(rx) and mod.x == 1 and mod.y == [1] and len(reg) == 1
    assert not reg.undo(rx)                     # (once)
    mod.y = 7                                   # someone replaced ours since
    assert not reg.undo(ry) and mod.y == 7 and len(reg) == 1
    reg.restore()                               # still checked at the end: left, noted
    assert mod.y == 7 and len(reg.notes) == 1

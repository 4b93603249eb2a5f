"""A custom op defined, called, and its Library destroyed, then the next one defined (a notebook
cell run again, a test per op): the dispatcher often gives the next op's name the memory the
last one's had, and memprof's name cache took a registered op's name by its address
unchecked - every later op's allocations read as the first op's."""

import pytest
import torch

import memprof

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def test_each_custom_op_keeps_its_own_name_after_the_last_one_is_deregistered():
    x = torch.ones(4)
    sizes = {}
    with memprof.track(torch.nn.Linear(2, 2)) as prof:
        for i in range(6):
            lib = torch.library.Library(f"mpreuse{i}", "DEF")
            lib.define("alloc(Tensor x) -> Tensor")
            n = 1000 + 10 * i           # each op's allocation told apart by its size
            lib.impl("alloc", lambda x, n=n: x.new_empty(n), "CPU")
            getattr(torch.ops, f"mpreuse{i}").alloc(x)
            lib._destroy()
            sizes[n * 4] = f"mpreuse{i}::alloc"
    p = prof.profile
    named = {}
    for size, op in zip(p.memory["size"].tolist(), p.memory["op"].tolist()):
        if size in sizes:
            named.setdefault(size, set()).add(p.strings[op] if op >= 0 else None)
    assert named == {size: {name} for size, name in sizes.items()}

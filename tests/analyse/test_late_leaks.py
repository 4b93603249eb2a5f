"""A leak that starts late in a long run, in a training function the block outlives (a
script's `main()` under `memprof run`): the looks at the 2nd, 4th, 8th, ... step end missed
it, or saw its first few tensors only (a new-user sweep: 12 tensors kept from step 65 of 78,
no finding at all). Memory that grows at several step ends in a row makes a look too."""
import torch
import torch.nn.functional as F

import memprof

D, CLASSES = 16, 4


def _loop(steps, keep_from, detach=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)

    def train():
        kept = []
        for i in range(steps):
            out = model(torch.randn(8, D, generator=g))
            if i >= keep_from:
                kept.append(out.detach().clone() if detach else out)
            F.cross_entropy(out, torch.randint(0, CLASSES, (8,), generator=g)).backward()
            opt.step()
            opt.zero_grad()

    with memprof.track(model, opt) as prof:
        train()   # returns before the block ends: its `kept` is gone by then
    return prof


def _looks(prof):
    return [step for step, _ in prof.run.records["leak_probe"]["looks"]]


def test_a_leak_that_starts_after_the_last_doubling_look_is_found_with_its_holder():
    prof = _loop(steps=44, keep_from=34)   # looks at 2, 4, ..., 32; the next would be 64
    found = [f for f in prof.findings if f.kind == "retained_graph"]
    assert len(found) == 1 and found[0].holder == "train.<locals>.kept", \
        [f.holder for f in found]
    steps = found[0].evidence["steps"]
    assert steps[0] == 34 and steps[-1] >= 40, steps   # seen near the end, not only once
    assert found[0].evidence["seen_after_step"] >= 41
    looks = _looks(prof)
    assert looks[:5] == [2, 4, 8, 16, 32] and len(looks) <= 5 + 4, looks


def test_the_probes_record_survives_a_save_and_the_finding_is_made_again(tmp_path):
    """A field added to the probe's graphs (a frozenset) made its record no JSON: the saved
    file silently lost it - the looks, and with them the pauses the throughput figures of a
    loaded profile take out."""
    prof = _loop(steps=44, keep_from=34)
    loaded = memprof.load(prof.save(str(tmp_path / "late.memprof")))
    record = loaded.run.records.get("leak_probe")
    assert record is not None and record["graphs"] and _looks(loaded) == _looks(prof)
    assert all(isinstance(g["unlogged"], list) for g in record["graphs"])
    assert [f.holder for f in loaded.findings if f.kind == "retained_graph"] == \
        ["train.<locals>.kept"]


def test_growth_without_graphs_is_looked_at_ever_less_often():
    """A detached feature bank grows memory at every step end and holds no graph: each
    look after a growing streak doubles the streak the next one waits for."""
    prof = _loop(steps=60, keep_from=0, detach=True)
    assert not [f for f in prof.findings if f.kind == "retained_graph"]
    growth_looks = [s for s in _looks(prof) if s & (s - 1)]   # not a power of two
    assert len(growth_looks) <= 4, _looks(prof)   # streaks of 4, 8, 16, 32 steps at most

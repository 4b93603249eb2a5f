"""Gradients of parameters no optimizer updates: a LoRA base left unfrozen (requires_grad
True, the optimizer given only the adapters) computed and kept a gradient of every base
weight - as large as the model - and memprof said nothing (no finding, "gradients" only)."""
import pytest
import torch
from torch import nn

import memprof


class LoraLinear(nn.Module):
    def __init__(self, d, rank=4):
        super().__init__()
        self.base = nn.Linear(d, d)
        self.a = nn.Parameter(torch.randn(rank, d) * 0.01)
        self.b = nn.Parameter(torch.zeros(d, rank))

    def forward(self, x):
        return self.base(x) + x @ self.a.t() @ self.b.t()


def _train(freeze: bool, steps=3, d=256):
    torch.manual_seed(0)
    model = nn.Sequential(LoraLinear(d), nn.ReLU(), LoraLinear(d))
    adapters = [p for n, p in model.named_parameters() if n.endswith((".a", ".b"))]
    if freeze:
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith((".a", ".b")))
    opt = torch.optim.AdamW(adapters, lr=1e-3)
    with memprof.track(model, optimizer=opt) as prof:
        for _ in range(steps):
            loss = model(torch.randn(8, d)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    base_grad_bytes = sum(p.grad.numel() * p.grad.element_size() for n, p in
                          model.named_parameters() if ".base." in n and p.grad is not None)
    return prof, base_grad_bytes


def test_unfrozen_base_gradients_are_a_finding(tmp_path):
    prof, base_grad_bytes = _train(freeze=False)
    assert base_grad_bytes == 2 * (256 * 256 + 256) * 4     # the ground truth: kept
    found = [f for f in memprof.findings(prof) if f.kind == "gradients_not_trained"]
    assert len(found) == 1, memprof.findings(prof)
    f = found[0]
    assert f.bytes == base_grad_bytes
    assert f.evidence["parameters"] == 4
    assert "0.base.weight" in f.message and "requires_grad_(False)" in f.fix
    # saved and loaded, it is still there
    loaded = memprof.load(prof.save(str(tmp_path / "lora.memprof")))
    assert [g.kind for g in memprof.findings(loaded)] == ["gradients_not_trained"]


def test_frozen_base_has_no_such_finding():
    prof, base_grad_bytes = _train(freeze=True)
    assert base_grad_bytes == 0
    assert not memprof.findings(prof, "info")


def test_an_optimizer_track_was_not_given_still_trains_its_parameters():
    # a GAN tracked with the generator's optimizer: the discriminator's optimizer steps its
    # own parameters (watched or not, an optimizer that steps them trains them), and one added
    # as a param group after the first step too
    torch.manual_seed(0)
    gen, disc, head = nn.Linear(16, 16), nn.Linear(16, 1), nn.Linear(16, 1)
    model = nn.ModuleDict({"gen": gen, "disc": disc, "head": head})
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    with memprof.track(model, optimizer=opt_g) as prof:
        for i in range(3):
            fake = gen(torch.randn(8, 16))
            (disc(fake.detach()).mean() + head(fake.detach()).mean()).backward()
            opt_d.step()
            if i == 0:
                opt_d.add_param_group({"params": head.parameters()})
            disc(fake).mean().backward()
            opt_g.step()
            opt_g.zero_grad()


def test_a_nested_block_has_the_finding_as_a_block_of_its_own_has():
    """A script's own block under `memprof run` nests in the run's: its profile had no
    gradients_not_trained where `python script.py` gave one (the run's recorder answered only
    when the run ended)."""
    torch.manual_seed(0)
    model = nn.Sequential(LoraLinear(64), nn.ReLU(), LoraLinear(64))
    opt = torch.optim.AdamW([p for n, p in model.named_parameters()
                             if n.endswith((".a", ".b"))], lr=1e-3)
    with memprof.track(auto_modules=True) as outer:
        with memprof.track(model, optimizer=opt) as inner:
            for _ in range(3):
                model(torch.randn(8, 64)).square().mean().backward()
                opt.step()
                opt.zero_grad()
    for prof in (inner, outer):
        found = [f for f in memprof.findings(prof) if f.kind == "gradients_not_trained"]
        assert len(found) == 1 and found[0].evidence["parameters"] == 4, memprof.findings(prof)


def test_a_new_optimizer_at_a_freed_ones_id_is_seen():
    """Progressive unfreezing: an optimizer of the head, freed, then one of the whole model.
    Where the second got the first one's id (CPython reuses freed addresses), its parameters
    were taken as untrained: the body's gradients were reported as no optimizer's."""
    import gc
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(16, 64)
    head_ids = set()

    def train(opt):
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)   # (the gradients stay, as with older code)

    with memprof.track(model) as prof:
        for _ in range(300):
            whole = torch.optim.SGD(model.parameters(), lr=0.01)
            if id(whole) in head_ids:   # stage 2's optimizer, at an id stage 1's had
                train(whole)
                break
            del whole
            gc.collect()
            for p in model[0].parameters():
                p.requires_grad_(False)
            head = torch.optim.SGD(model[2].parameters(), lr=0.01)
            head_ids.add(id(head))
            train(head)
            del head
            gc.collect()
            for p in model[0].parameters():
                p.requires_grad_(True)
        else:
            pytest.skip("no optimizer got a freed one's id in 300 tries")
    assert model[0].weight.grad is not None
    assert not [f for f in memprof.findings(prof, "info") if f.kind == "gradients_not_trained"]


def test_the_blocks_end_look_replaces_a_look_while_the_loop_ran():
    """A look at the 2nd step's end sees the base's gradients (record.live_look); the script
    freezes the base and drops them at the 3rd step: where the model outlives the block, the
    look as it ends is the one that counts (no finding), and a model built and freed inside
    the block - a train() function returning before the block ends - keeps the loop's look,
    saying at which step it was made."""
    torch.manual_seed(0)
    model = nn.Sequential(LoraLinear(64), nn.ReLU(), LoraLinear(64))
    opt = torch.optim.AdamW([p for n, p in model.named_parameters()
                             if n.endswith((".a", ".b"))], lr=1e-3)
    with memprof.track(model, optimizer=opt) as prof:
        for i in range(3):
            if i == 2:
                for n, p in model.named_parameters():
                    if ".base." in n:
                        p.requires_grad_(False)
                        p.grad = None
            model(torch.randn(8, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert [f.kind for f in memprof.findings(prof, "info")] == []

    def train():
        torch.manual_seed(0)
        model = nn.Sequential(LoraLinear(64), nn.ReLU(), LoraLinear(64))
        opt = torch.optim.AdamW([p for n, p in model.named_parameters()
                                 if n.endswith((".a", ".b"))], lr=1e-3)
        for _ in range(3):
            model(torch.randn(8, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()

    with memprof.track(auto_modules=True) as prof:   # (as memprof run tracks)
        train()
    found = [f for f in memprof.findings(prof) if f.kind == "gradients_not_trained"]
    assert len(found) == 1, memprof.findings(prof, "info")
    assert found[0].evidence["parameters"] == 4 and found[0].evidence["steps"] == 2
    assert found[0].bytes == 2 * (64 * 64 + 64) * 4
    assert "after step 2 of 3" in found[0].message

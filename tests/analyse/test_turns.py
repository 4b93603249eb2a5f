"""Optimizers taking turns (analyse.turns): a GAN's two steps per iteration read the batch
once, not twice (samples/s was twice the loop's rate under `memprof run`); a k-fold loop's
optimizers, one per fold, take no turns (the leak check took an earlier fold's steps as
current, and missed a leak made in the last fold)."""
import pytest
import torch
from torch import nn

import memprof
from memprof.analyse.turns import last_round_start, round_samples, rounds

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def test_rounds_end_with_the_optimizer_that_steps_least_often():
    d, g = 1, 2
    assert rounds([d, g] * 3) == [[0, 1], [2, 3], [4, 5]]
    assert rounds([g, d] * 2 + [g]) == [[0, 1], [2, 3]]          # the last step is no round
    assert rounds(([d] * 5 + [g]) * 2) == [list(range(6)), list(range(6, 12))]   # WGAN
    assert rounds([d] * 4) is None                                # one optimizer
    assert rounds([1, 1, 1, 2, 2, 2]) is None                     # one after the other
    assert rounds([d, g, d, 0]) is None                           # a prof.step() boundary


def test_a_rounds_samples_are_those_of_the_optimizer_that_saw_most():
    assert round_samples([0, 1], [1, 2], [64, 64]) == 64          # a GAN: D's, then G's
    assert round_samples([0, 1, 2], [1, 1, 2], [64, 64, 64]) == 128   # two critic steps
    assert round_samples([0, 1], [1, 2], [64, None]) == 64        # AdamW after Muon
    assert round_samples([0, 1], [1, 2], [None, None]) is None


def test_an_earlier_folds_optimizer_does_not_widen_the_last_round():
    assert last_round_start([1, 1, 1, 2, 2, 2], 5) == 5
    assert last_round_start([1, 2, 1, 2, 3, 3], 5) == 5
    assert last_round_start([1, 2, 1, 2, 1, 2], 5) == 4


def _gan_iterations(n, batch=32):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))
    D = nn.Sequential(nn.Linear(32, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    og, od = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    bce = nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(batch, 1), torch.zeros(batch, 1)
    with memprof.track(auto_modules=True) as prof:
        for _ in range(n):
            fake = G(torch.randn(batch, 16))
            loss_d = bce(D(torch.randn(batch, 32)), ones) + bce(D(fake.detach()), zeros)
            od.zero_grad()
            loss_d.backward()
            od.step()
            loss_g = bce(D(fake), ones)
            og.zero_grad()
            loss_g.backward()
            og.step()
    return prof


def test_a_gans_samples_per_second_are_per_iteration():
    prof = _gan_iterations(8)
    tp = prof.throughput
    assert tp["steps"] == 16 and tp["samples_per_s_per"] == "round of 2 optimizers' steps"
    per = tp["per_step"]
    for k in range(0, 16, 2):   # each iteration: the batch over both steps' time
        both_ms = per["wall_ms"][k] + per["wall_ms"][k + 1]
        assert per["samples_per_s"][k] == per["samples_per_s"][k + 1] == \
            pytest.approx(32 / (both_ms * 1e-3), rel=1e-3)
    rates = [per["samples_per_s"][k] for k in range(2, 16, 2)]   # after the warm-up step
    assert tp["stats"]["samples_per_s"]["n"] == 7
    assert tp["stats"]["samples_per_s"]["median"] == pytest.approx(
        sorted(rates)[3], rel=1e-3)


def test_a_leak_in_the_last_fold_is_found_beside_earlier_folds_optimizers():
    kept, optimizers = [], []   # the folds' optimizers stay alive: their ids are not reused
    with memprof.track(auto_modules=True) as prof:
        for fold in range(3):
            torch.manual_seed(fold)
            model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            optimizers.append(opt)
            for _ in range(4):
                loss = model(torch.randn(16, 32)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if fold == 2:
                    kept.append(loss)   # the graph of every step of the last fold
    kinds = [f.kind for f in memprof.findings(prof)]
    assert "retained_graph" in kinds, kinds


def test_an_optimizer_whose_first_step_a_grad_scaler_skipped_keeps_one_label():
    torch.manual_seed(0)
    G, D = nn.Linear(4, 4), nn.Linear(4, 1)
    og = torch.optim.SGD(G.parameters(), lr=0.1)
    od = torch.optim.SGD(D.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with memprof.track(auto_modules=True) as prof:
        for i in range(6):
            scaler.scale(D(G(torch.randn(8, 4)).detach()).mean()).backward()
            if i == 0:
                D.weight.grad[0, 0] = float("inf")   # D's first update skipped
            scaler.step(od)
            scaler.update()
            od.zero_grad()
            D(G(torch.randn(8, 4))).mean().backward()
            og.step()
            og.zero_grad()
    assert prof.profile.run.records["step_owners"] == [1, 2] * 6
    assert prof.profile.run.records["skipped_steps"] == [0]
    assert prof.throughput["samples_per_s_per"] == "round of 2 optimizers' steps"

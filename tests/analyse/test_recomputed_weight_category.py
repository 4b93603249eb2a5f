"""Old-style `torch.nn.utils.weight_norm` / `spectral_norm` recompute `module.weight` from
weight_g / weight_v (weight_orig / sigma) in a forward pre-hook at every call and keep it on
the module until the next one. memprof counted that weight as the module's activations (a
1 MiB weight read as 1 MiB of activations per step in `activations_by_module`, the same at
any batch size) and the scaled fit shrank it with the batch. It is parameter-derived memory,
one per module, the same at any batch: the category `recomputed_weights`, owned by its
module, never scaled."""
import warnings

import numpy as np
import torch

import memprof
from memprof.plan.fit import scaled_stream
from memprof.record.events import PHASE_FORWARD

D, C, STEPS = 512, 8, 3
WEIGHT = D * D * 4


def _train(batch: int):
    torch.manual_seed(0)
    with warnings.catch_warnings():   # the old-style functions' deprecation warnings
        warnings.simplefilter("ignore")
        model = torch.nn.Sequential(torch.nn.utils.weight_norm(torch.nn.Linear(D, D)),
                                    torch.nn.utils.spectral_norm(torch.nn.Linear(D, D)),
                                    torch.nn.Linear(D, C))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(batch, D, generator=g) for _ in range(STEPS)]
    with memprof.track(model, opt, batch_size=batch) as prof:
        for x in data:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return prof


def test_the_recomputed_weight_is_its_own_category_not_activations():
    small, large = _train(16), _train(64)
    for prof in (small, large):
        at_peak = prof.breakdown("category")
        assert at_peak["recomputed_weights"] == 2 * WEIGHT, at_peak   # one per module
        modules = prof.breakdown("module")
        assert modules["Sequential.0"] >= WEIGHT and modules["Sequential.1"] >= WEIGHT
    # what each module's forward left for backward: its output, which grows with the batch
    a_small, a_large = small.activations_by_module(), large.activations_by_module()
    for name in ("Sequential.0", "Sequential.1"):
        assert a_small[name] < WEIGHT, a_small
        assert a_large[name] / a_small[name] > 3, (a_small, a_large)


def test_the_scaled_fit_leaves_the_recomputed_weight_at_its_size():
    prof = _train(64)
    step = prof.steps[-1]
    _, full = scaled_stream(prof, step, 1.0, accumulate=False)
    _, quarter = scaled_stream(prof, step, 0.25, accumulate=False)
    n = full.size
    forward = prof.memory["phase"][:n] == PHASE_FORWARD
    weights = np.flatnonzero(forward & (full == WEIGHT))
    assert weights.size >= 2 * STEPS    # both modules' weights, each forward
    assert (quarter[weights] == WEIGHT).all(), quarter[weights]
    # the outputs (batch x D floats) are still scaled
    outputs = np.flatnonzero(forward & (full == 64 * D * 4))
    assert outputs.size and (quarter[outputs] == 16 * D * 4).all()

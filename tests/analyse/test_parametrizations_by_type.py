"""torch's parametrization container is found by its type, not by its name. A model of the
user's own with a submodule list named `parametrizations` (`self.parametrizations =
nn.ModuleList(...)`) read as torch's ParametrizationList: everything its layers made in the
passes was `recomputed_weights`, owned by the model, and the scaled fit kept the layers'
activations whole at any batch. A real parametrization beside it (new-style weight_norm)
is still found, also in a saved and loaded profile."""
import numpy as np
import pytest
import torch
from torch.nn.utils.parametrizations import weight_norm

import memprof
from memprof.plan.allocator import simulate
from memprof.plan.fit import scaled_stream
from memprof.record.events import CAT_RECOMPUTED_WEIGHTS, PHASE_FORWARD

D, C, STEPS = 256, 8, 3
WEIGHT = D * D * 4
SMALL, LARGE = 16, 128


class Mixer(torch.nn.Module):
    """Its own layers under the attribute name `parametrizations`; one head parametrized."""

    def __init__(self):
        super().__init__()
        self.parametrizations = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU()) for _ in range(3)])
        self.head = weight_norm(torch.nn.Linear(D, C))

    def forward(self, x):
        for layer in self.parametrizations:
            x = layer(x)
        return self.head(x)


def train(batch: int):
    torch.manual_seed(0)
    model = Mixer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(batch, D, generator=g) for _ in range(STEPS)]
    with memprof.track(model, opt) as prof:
        for x in data:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return prof.profile


@pytest.fixture(scope="module")
def runs():
    return {b: train(b) for b in (SMALL, LARGE)}


def _recomputed_owners(p) -> set[str]:
    sel = (p.category == CAT_RECOMPUTED_WEIGHTS) & (p.memory["size"] > 0)
    return {p.module_name(int(m)) for m in p.event_module[sel]}


def test_a_module_named_parametrizations_is_the_users(runs, tmp_path):
    p = runs[LARGE]
    # the layers' outputs (batch x D floats, saved by their ReLU) are their activations
    acts = p.activations_by_module()
    for i in range(3):
        assert acts.get(f"parametrizations.{i}.1", 0) >= STEPS * LARGE * D * 4, acts
    # the head's weight_norm is torch's: its weight (D x C floats) is recomputed_weights
    assert _recomputed_owners(p) == {"head"}
    saved = tmp_path / "mixer.memprof"
    p.save(saved)
    assert _recomputed_owners(memprof.load(saved)) == {"head"}


def test_the_layers_activations_scale_with_the_batch(runs):
    seen, other = runs[LARGE], runs[SMALL]
    step = seen.steps[-1]
    _, full = scaled_stream(seen, step, 1.0, accumulate=False)
    _, scaled = scaled_stream(seen, step, SMALL / LARGE, accumulate=False)
    n = full.size
    outputs = np.flatnonzero((seen.memory["phase"][:n] == PHASE_FORWARD)
                             & (full == LARGE * D * 4))
    assert outputs.size >= 3 * STEPS and (scaled[outputs] == SMALL * D * 4).all()
    r = simulate((scaled_stream(seen, step, SMALL / LARGE, accumulate=False)),
                 capacity=1 << 40)
    real = simulate(scaled_stream(other, other.steps[-1], 1.0, accumulate=False),
                    capacity=1 << 40)
    predicted = int(r.allocated[step.start:step.end].max())
    actual = int(real.allocated[other.steps[-1].start:other.steps[-1].end].max())
    assert predicted == pytest.approx(actual, rel=0.15), (predicted, actual)


@pytest.mark.parametrize("value", [[[0]], [[0, 10_000]], "x"])
def test_a_hand_edited_parametrization_record_is_a_format_error(runs, tmp_path, value):
    """The analyses index module names by it: a file that says otherwise is refused when
    read, one line."""
    import json
    import zipfile
    from memprof.profile_file import ProfileFormatError
    path = tmp_path / "run.memprof"
    runs[SMALL].save(path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    header = json.loads(members["header.json"])
    assert header["records"]["parametrizations"]      # the head's weight_norm
    header["records"]["parametrizations"] = value
    members["header.json"] = json.dumps(header).encode()
    edited = tmp_path / "edited.memprof"
    with zipfile.ZipFile(edited, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(ProfileFormatError, match="edited.memprof: .*parametrizations"):
        memprof.load(str(edited))

"""An EMA kept as a list of tensors, not as a module: diffusers' EMAModel (`shadow_params`,
updated with `sub_` under no_grad) or a plain list of cloned parameters updated with
`torch._foreach_lerp_`. Its bytes read "other", with no owner; they are parameters not
trained, named after what the loop calls them. Lists of tensors that are no such copy (kept
unchanged, or not shaped like the trained parameters) stay what they were."""
import pytest
import torch

import memprof
from memprof.analyse import summary

pytestmark = pytest.mark.usefixtures("collect_garbage_after")


def net():
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 64))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ShadowEma:
    """diffusers' EMAModel, rebuilt in its shape: a plain object holding a list of tensors."""

    def __init__(self, parameters, decay=0.999):
        self.shadow_params = [p.clone().detach() for p in parameters]
        self.decay = decay

    @torch.no_grad()
    def step(self, parameters):
        one_minus_decay = 1 - self.decay
        for s_param, param in zip(self.shadow_params, parameters):
            s_param.sub_(one_minus_decay * (s_param - param))


def train(mode, kind, made, n=6):
    """(profile, model, the kept tensors) of a loop keeping `kind` beside the model."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def make(model):
        if kind == "diffusers":
            return ShadowEma(model.parameters())
        if kind == "metrics":   # changed at each step, but shaped like no parameter
            return [torch.zeros(1000), torch.zeros(7)]
        return [p.detach().clone() for p in model.parameters()]

    def loop(model, opt, ema):
        for _ in range(n):
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if kind == "diffusers":
                ema.step(model.parameters())
            elif kind == "foreach":
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 0.001)
            elif kind == "metrics":
                torch._foreach_add_(ema, 1.0)
            # "unchanged": the first weights kept (an L2-SP regulariser's anchor)
        return ema

    ema = make(model) if made == "before" else None
    if mode == "auto":
        with memprof.track(auto_modules=True) as prof:
            model = net()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            ema = loop(model, opt, make(model))
    else:
        with memprof.track(model, opt) as prof:
            ema = loop(model, opt, make(model) if ema is None else ema)
    kept = ema.shadow_params if kind == "diffusers" else ema
    return prof, model, kept


CASES = [(mode, kind, made) for mode in ("auto", "model") for kind in ("diffusers", "foreach")
         for made in (("inside",) if mode == "auto" else ("before", "inside"))]


@pytest.mark.parametrize("mode,kind,made", CASES)
def test_an_ema_kept_as_a_list_of_tensors_is_not_trained_and_named(mode, kind, made):
    prof, model, kept = train(mode, kind, made)
    ema = nbytes(kept)
    assert summary(prof)["parameters_at_peak"] == {
        "trainable": nbytes(model.parameters()), "frozen": 0, "not_trained": ema}
    name = "ema.shadow_params" if kind == "diffusers" else "ema"
    assert prof.breakdown("module").get(name) == ema


@pytest.mark.parametrize("kind", ["unchanged", "metrics"])
def test_other_lists_of_tensors_stay_other(kind):
    """A list that mirrors the parameters but never changes, or one that changes but
    mirrors none of them, is no EMA."""
    prof, model, kept = train("model", kind, "before")
    split = summary(prof)["parameters_at_peak"]
    assert split in (None, {"trainable": nbytes(model.parameters()), "frozen": 0,
                            "not_trained": 0})
    assert prof.breakdown("category")["parameters"] == nbytes(model.parameters())


def test_diffusers_ema_model_is_not_trained():
    """The real EMAModel, where diffusers is installed."""
    diffusers = pytest.importorskip("diffusers.training_utils")
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = diffusers.EMAModel(model.parameters(), decay=0.99)
    with memprof.track(model, opt) as prof:
        for _ in range(6):
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ema.step(model.parameters())
    kept = nbytes(ema.shadow_params)
    assert summary(prof)["parameters_at_peak"]["not_trained"] == kept
    assert prof.breakdown("module").get("ema.shadow_params") == kept


class Logs:
    """What a loop keeps beside its model: lists of tensors that are no EMA."""


def test_an_ema_list_made_after_many_other_lists_is_still_found():
    """20 lists and tuples of tensors in the loop's frame (losses, batches) take no slot of
    the lists looked after (not_trained.MAX_BESIDE): an EMA list made later is found."""
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logs = Logs()
    for i in range(20):
        setattr(logs, f"losses_{i}", [torch.zeros(()), torch.zeros(5)])
    batch = (torch.randn(32, 32), torch.randn(32))   # shaped like the weight and the bias
    ema = None
    with memprof.track(model, opt) as prof:
        for step in range(10):
            batch = (torch.randn(32, 32), torch.randn(32))
            loss = (model(batch[0]) - batch[1]).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            logs.losses_0.append(loss.detach())
            if step == 3:   # made after the first looks
                ema = [p.detach().clone() for p in model.parameters()]
            elif ema is not None:
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 0.1)
    assert summary(prof)["parameters_at_peak"]["not_trained"] == nbytes(ema)
    assert prof.breakdown("module").get("ema") == nbytes(ema)


def test_a_tuple_batch_shaped_like_the_parameters_is_no_list_beside():
    """A batch `(x, y)` mirrors a Linear(32, 32)'s weight and bias: an EMA is kept in a
    list, a tuple is looked past (and lists that mirror no parameter: `losses`)."""
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = [torch.zeros(())]
    with memprof.track(model, opt) as prof:
        for _ in range(5):
            batch = (torch.randn(32, 32), torch.randn(32))
            (model(batch[0]) - batch[1]).square().mean().backward()
            opt.step()
            opt.zero_grad()
        kept = prof.session.snapshots.beside.kept()   # (what the looks at steps 2, 4 took)
    assert kept == {}

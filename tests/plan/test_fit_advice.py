"""A step too big for a budget: diagnosed as such, with a smaller configuration that fits -
checked by re-estimating it on fake tensors and by running it for real."""
import pytest
import torch

import memprof
from memprof.plan.estimate import estimate_step
from memprof.plan.allocator import simulate
from memprof.plan.budget import replay
from memprof.plan.fit import (batch_function, optimizer_factory, precision_of, scaled_fit,
                              scaled_stream, what_fits)

MIB = 1 << 20
BATCH = 1024


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 10))


def train(micro_batch: int, accumulation: int = 1, steps: int = 2, budget=None):
    """AdamW steps of the MLP at micro_batch x accumulation, tracked with `budget`."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    data = [(torch.randn(micro_batch, 512), torch.randint(0, 10, (micro_batch,)))
            for _ in range(steps * accumulation)]
    with memprof.track(model, opt, budget=budget) as prof:
        for i, (x, y) in enumerate(data):
            loss = torch.nn.functional.cross_entropy(model(x), y) / accumulation
            loss.backward()
            if (i + 1) % accumulation == 0:
                opt.step()
                opt.zero_grad()
    return prof, model, opt


@pytest.fixture(scope="module")
def too_big():
    """The MLP at batch 1024 against 24 MiB: its first step does not fit."""
    return train(BATCH, budget=24 * MIB)


def test_first_step_too_big_is_diagnosed_as_such(too_big):
    prof, _, _ = too_big
    fail = prof.meta["budget"]["failure"]
    assert fail["where"]["step"] == 0
    assert fail["cause"]["cause"] == "step_too_big" and fail["cause"]["first_step"]
    [f] = [f for f in prof.findings if f.kind == "budget"]
    assert "first step already did not fit" in f.message and "what would fit" in f.fix


def test_scaled_micro_batch_fits_when_run_for_real(too_big):
    prof, _, _ = too_big
    scaled = prof.meta["fit"]["scaled"]
    assert scaled["fits"] and scaled["batch"] == BATCH
    m, acc = scaled["micro_batch"], scaled["accumulation"]
    assert 1 <= m < BATCH and m * acc >= BATCH
    real, _, _ = train(m, acc, budget=24 * MIB)
    b = real.meta["budget"]
    assert b["fits"], b["failure"]
    assert b["peak_reserved"] == pytest.approx(scaled["peak_reserved"], rel=0.15)
    # the answer is the largest: one sample more per micro-batch does not fit
    p = prof.profile
    assert simulate(scaled_stream(p, p.steps[-1], (m + 1) / BATCH, True), capacity=24 * MIB,
                    return_timeline=False).oom
    assert scaled_fit(p, 24 * MIB, 0)["micro_batch"] == m     # deterministic


def _check_options(est, model, opt, inputs, budget):
    """Every option the re-estimate says fits does fit when estimated again at that very
    micro-batch; returns the fitting ones."""
    make_batch = batch_function(model, inputs, est["micro_batch"])
    fitting = [o for o in est["options"] if o.get("fits")]
    for o in fitting:
        assert o["micro_batch"] * o["accumulation"] == est["batch"]
        e = estimate_step(model, make_batch, batch_size=o["micro_batch"],
                          optimizer=optimizer_factory(opt), precision=o["precision"],
                          checkpointing=o["checkpointing"])
        variant = "accumulate" if o["accumulation"] > 1 else "steady"
        assert e.peak(variant, reserved=True) <= budget, o
    return fitting


def test_re_estimate_runs_for_the_recorded_model(too_big):
    prof, model, opt = too_big
    est = prof.meta["fit"]["estimate"]
    assert est is not None, prof.meta["fit"]["note"]
    assert est["precision"] == "fp32" and est["batch"] == BATCH
    assert not est["current"]["fits"]                 # the recorded configuration does not
    assert {(o["precision"], o["checkpointing"]) for o in est["options"]} >= {("fp32", "none")}
    _check_options(est, model, opt, prof.run.records["inputs"], 24 * MIB)
    # what every estimate holds and the CPU run did not (a small budget's "micro-batch 1
    # needs 24 MiB" against a 3 MiB run read as an error): said, with its size
    assert any("16.25 MiB of cuBLAS workspaces" in a for a in est["assumptions"])


def test_re_estimated_smaller_configuration_fits_when_estimated_again():
    """A wide MLP at batch 4096 (activations dominate) against a budget between what the
    estimator gives a quarter of the batch and what the recorded step needs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = 4096
    with memprof.track(model, opt) as prof:
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(torch.randn(batch, 256)),
                                                     torch.randint(0, 10, (batch,)))
            loss.backward()
            opt.step()
            opt.zero_grad()
    inputs = prof.run.records["inputs"]
    quarter = estimate_step(model, batch_function(model, inputs, batch), batch_size=batch // 4,
                            optimizer=optimizer_factory(opt)).peak("accumulate", reserved=True)
    recorded = replay(prof.profile, 1 << 40).peak_reserved
    assert quarter < recorded, "the estimator's quarter batch no longer fits under the record"
    budget = (quarter + recorded) // 2
    result = replay(prof.profile, budget)
    assert not result.fits and result.failure["cause"]["cause"] == "step_too_big"
    fit = what_fits(prof.profile, budget, budget, "test budget",
                    result.failure["where"]["step"], model=model, optimizer=opt)
    est = fit["estimate"]
    assert est is not None, fit["note"]
    fitting = _check_options(est, model, opt, inputs, budget)
    assert any(o["precision"] == "fp32" and o["checkpointing"] == "none" for o in fitting)
    assert fit["scaled"]["fits"] and fit["scaled"]["micro_batch"] < batch


def test_report_says_what_would_fit(too_big):
    from rich.console import Console
    prof, _, _ = too_big
    console = Console(record=True, width=200)
    prof.report(console=console)
    text = console.export_text()
    assert "Budget: a budget of 24.00 MiB" in text and "does not fit" in text
    assert "What would fit" in text and "estimates" in text
    assert "scaled to a smaller micro-batch" in text and "re-estimated on fake tensors" in text


def test_a_later_step_too_big_after_the_optimizer_state():
    prof, _, _ = train(BATCH, budget=28 * MIB)
    fail = prof.meta["budget"]["failure"]
    assert fail["where"]["step"] == 1 and fail["cause"]["cause"] == "step_too_big"
    assert not fail["cause"]["first_step"]
    assert fail["alive"]["by_category"]["optimizer_state"] > 0
    assert prof.meta["fit"]["scaled"]["fits"]


def test_recorded_inputs_and_precision():
    model = make_model()
    with memprof.track(model) as prof:
        model(torch.randn(3, 512))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(5, 512))
    inputs = prof.run.records["inputs"]
    assert inputs["args"] == [{"tensor": {"shape": [3, 512], "dtype": "float32",
                                          "device": "cpu"}}]
    assert precision_of(inputs) == "fp32"
    assert precision_of({"autocast": {"cuda": "float16"}}) == "fp16"
    x, _ = batch_function(model, inputs, 3)(7)
    assert x[0].shape == (7, 512) and x[0].dtype == torch.float32


def test_oom_without_the_model_explains_how_to_get_more():
    prof, _, _ = train(BATCH, steps=1)
    out = what_fits(prof.profile, 24 * MIB, 24 * MIB, "24 MiB", 0)
    assert out["scaled"]["fits"] and out["estimate"] is None
    assert "memprof.track(model" in out["note"]


def test_what_fits_keeps_the_effective_batch_of_a_run_that_accumulates():
    """At 1024 x 4 (effective batch 4096) the advice read "512 x 2 (effective batch 1024)":
    following it cut the effective batch by the run's own accumulation, LR unchanged."""
    prof, model, opt = train(BATCH, accumulation=4, steps=2)
    fit = what_fits(prof.profile, 24 * MIB, 24 * MIB, "24 MiB", 0, model=model, optimizer=opt)
    scaled = fit["scaled"]
    assert scaled["accumulation_seen"] == 4 and scaled["effective_batch"] == 4 * BATCH
    assert scaled["fits"] and scaled["micro_batch"] * scaled["accumulation"] == 4 * BATCH
    assert "the run: 1024 x 4" in scaled["text"]
    est = fit["estimate"]
    assert est is not None, fit["note"]
    assert (est["batch"], est["micro_batch"], est["accumulation"]) == (4 * BATCH, BATCH, 4)
    assert "micro-batch 1024 x 4 accumulation" in est["current"]["text"]
    for o in est["options"]:
        assert not o.get("fits") or o["micro_batch"] * o["accumulation"] == 4 * BATCH


def test_a_batch_the_loop_makes_is_scaled_with_the_micro_batch():
    """A loop that makes (or loads) its batch inside the block: the 2 MiB batch stayed full
    size in the replay and alone read "even micro-batch 1 does not fit"; with the batch made
    before the block the same step gave 512 x 2."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(2 * BATCH, 512),
                                       torch.randint(0, 10, (2 * BATCH,))), batch_size=BATCH)
    with memprof.track(model, opt) as prof:
        for x, y in loader:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    made_inside = scaled_fit(prof.profile, 24 * MIB, 0)
    assert made_inside["fits"], made_inside["text"]
    made_before = scaled_fit(train(BATCH)[0].profile, 24 * MIB, 0)
    assert made_inside["micro_batch"] == made_before["micro_batch"]


class _KeywordsOnly(torch.nn.Module):
    """A forward that takes **kwargs, as PEFT's PeftModel and many wrappers' do."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(16, 4)

    def forward(self, **kw):
        return torch.nn.functional.cross_entropy(self.body(kw["x"]), kw["y"])


def test_a_batch_is_rebuilt_for_a_forward_that_takes_keywords_only():
    """The keywords were bound as {'kwargs': {...}}: the re-estimate failed with KeyError 'x'
    (PEFT without task_type: "specify either input_ids or inputs_embeds")."""
    model = _KeywordsOnly()
    with memprof.track(model) as prof:
        model(x=torch.randn(32, 16), y=torch.randint(0, 4, (32,))).backward()
    inputs, _ = batch_function(model, prof.run.records["inputs"], 32)(8)
    assert set(inputs) == {"x", "y"} and inputs["x"].shape == (8, 16)
    assert model(**inputs).dim() == 0


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(1024, 1024)
        self.head = torch.nn.Linear(1024, 4)

    def forward(self, x):
        h = self.body(x).relu()
        return h, self.head(h)


def test_a_second_backward_of_the_same_pass_is_no_micro_step_and_weights_never_scale():
    """An auxiliary loss's second backward() read as accumulation (effective batch 512 for
    256); a weight of the input's size (1024 x 1024) was scaled with the batch as if it
    were the batch the loop made."""
    from memprof.plan.fit import _scalable, accumulation_at
    torch.manual_seed(0)
    model = _TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, opt) as prof:
        for _ in range(3):
            h, out = model(torch.randn(1024, 1024))
            h.square().mean().backward(retain_graph=True)    # an auxiliary loss
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
    p = prof.profile
    assert accumulation_at(p, 1) == 1
    scal = _scalable(p, p.memory.size, 1024)
    first = p.memory["thread"] < 0                           # blocks from before the block
    assert not (scal & first).any()
    assert (scal & (p.memory["size"] == 1024 * 1024 * 4) & ~first).any()   # the batches

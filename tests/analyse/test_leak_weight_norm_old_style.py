"""Old-style `torch.nn.utils.weight_norm` (deprecated, still in many vocoders and seq2seq
codebases): a forward pre-hook recomputes `module.weight` from weight_g/weight_v at each
forward and keeps it as a plain attribute, with its graph, until the next forward. A module
not called in the last step (an auxiliary head used every other step) kept the weight of an
earlier step: the leak check read it as an error, 'retained_graph ... still alive after later
steps' backward', with the fix 'detach state carried across steps' - failing the README's CI
gate on a correct loop. It is kept by design, one per module, and does not grow: an info
finding that names the module's weight; a real leak beside it is still an error."""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import memprof

D, STEPS = 64, 6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():   # weight_norm's deprecation warning
            warnings.simplefilter("ignore")
            wn = torch.nn.utils.weight_norm
            self.body = nn.Sequential(wn(nn.Linear(D, D)), nn.ReLU())
            self.head = wn(nn.Linear(D, 4))
            self.aux = wn(nn.Linear(D, D))    # an auxiliary loss in the first step only

    def forward(self, x, aux):
        h = self.body(x)
        out = self.head(h)
        return out + self.aux(h).mean() if aux else out


def _train(in_function: bool, keep_outputs: bool = False):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, D, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(STEPS)]

    def step(i, x, y, history):
        out = model(x, aux=i == 0)
        F.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad()
        if keep_outputs:
            history.append(out)

    def loop():
        history = []
        for i, (x, y) in enumerate(data):
            step(i, x, y, history)
        return history

    with memprof.track(model, opt) as prof:
        if in_function:      # the probe's to see while loop() runs
            kept = loop()
        else:                # the end-of-block check's
            kept = []
            for i, (x, y) in enumerate(data):
                out = model(x, aux=i == 0)
                F.cross_entropy(out, y).backward()
                opt.step()
                opt.zero_grad()
                if keep_outputs:
                    kept.append(out)
    del kept
    return prof


def _kinds(prof):
    return sorted((f.kind, f.severity, f.holder) for f in prof.findings)


def test_a_weight_norm_weight_kept_by_its_module_is_no_retained_graph():
    prof = _train(in_function=False)
    assert memprof.findings(prof) == []
    info = [f for f in prof.findings if f.holder == "model.aux.weight"]
    assert [(f.kind, f.severity) for f in info] == [("recomputed_weight", "info")]
    assert info[0].bytes == D * D * 4
    assert "weight_norm" in info[0].message and "one per module" in info[0].message


def test_seen_by_the_probe_while_the_loop_function_runs():
    """The loop in a function: the probe looks at step ends 2 and 4 while it runs."""
    prof = _train(in_function=True)
    assert 2 in [n for n, _ in prof.run.records["leak_probe"]["looks"]]
    assert memprof.findings(prof) == []


def test_a_real_leak_beside_it_is_still_an_error():
    prof = _train(in_function=False, keep_outputs=True)
    errors = [f for f in memprof.findings(prof) if f.kind == "retained_graph"]
    assert errors and all("aux.weight" not in f.holder for f in errors)

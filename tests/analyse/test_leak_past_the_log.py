"""A leak that starts after the event log filled: its tensors' addresses can be those of
logged blocks whose frees were dropped too, and the finding took that block's size and creator
("pinning 128 B; created by aten::sum in Sequential.0 (backward)" for 12.38 KiB of forward
outputs)."""
import warnings

import torch

import memprof


def test_a_leak_past_the_logs_end_counts_the_tensors_own_bytes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters())
    kept = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the dropped-events warning: expected here
        with memprof.track(model, opt, capacity=2000) as prof:
            for step in range(120):
                out = model(torch.randn(8, 32))
                out.square().mean().backward()
                opt.step()
                opt.zero_grad()
                if step >= 90:   # long after the log filled (2,000 events: a few steps)
                    kept.append(out)
    assert prof.meta["dropped"] > 0
    (f,) = [f for f in prof.findings if f.kind == "retained_graph"]
    assert f.holder.endswith("kept")
    # the kept outputs (8 x 4 float32 each, all but the last step's) and the inputs and
    # activations their graphs saved: counted from the tensors, not from stale log entries
    outputs = sum(t.untyped_storage().nbytes() for t in kept[:-1])
    assert f.bytes >= outputs and f.evidence["tensor_bytes"] == outputs
    assert "allocated after the event log filled: their creator is not recorded" in f.message
    assert "created by" not in f.message

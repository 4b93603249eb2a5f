"""What a loop does after its last optimizer step, inside the tracked block: a step's work (an
evaluation pass, a step cut short by an error) is a partial step; bookkeeping (a running loss,
a framework's end-of-training summary) is recorded but no step - 3 updates read
"3 + partial" (4 steps) for the 4 bytes of `total + loss.detach()` after the last one."""
import torch

import memprof


def _run(after):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters())
    total = torch.zeros(())
    with memprof.track(model, opt) as prof:
        for _ in range(3):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            total = total + loss.detach()          # bookkeeping after each update
        after(model)
    return prof


def test_bookkeeping_after_the_last_update_is_no_step():
    prof = _run(lambda model: None)
    assert len(prof.steps) == len(prof.markers("step")) == 3
    assert not prof.partial_last_step and prof.steps_label == "3"
    # still recorded: the running loss's allocation after the last boundary
    tail = prof.memory[prof.steps[-1].end:]
    assert (tail["size"] > 0).any()


def test_an_evaluation_pass_after_the_last_update_is_a_partial_step():
    def evaluate(model):
        with torch.no_grad():
            model(torch.randn(256, 16))
    prof = _run(evaluate)
    assert len(prof.steps) == 4 and prof.partial_last_step
    assert prof.steps_label == "3 + partial"
    assert prof.steps[-1].allocated >= 256 * 32 * 4      # the evaluation's activations

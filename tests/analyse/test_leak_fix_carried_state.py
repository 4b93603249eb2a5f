"""word_language_model's LSTM without repackage_hidden(): the carried state is a tuple
`hidden = (h, c)` rebound every window, so its paths index it (`hidden[0]`, `hidden[1]`).
The fix read as for a list that grows ("keep `loss.item()` in the container"); it is the
fix a GRU's single hidden tensor gets: detach the state carried across steps."""
import pytest
import torch
import torch.nn.functional as F

import memprof

VOCAB, HIDDEN, BPTT, BATCH, WINDOWS = 20, 16, 5, 4, 6


class LstmLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Embedding(VOCAB, HIDDEN)
        self.rnn = torch.nn.LSTM(HIDDEN, HIDDEN)
        self.decoder = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens, hidden):
        output, hidden = self.rnn(self.encoder(tokens), hidden)
        return self.decoder(output), hidden


def _train(model, data, keep_losses=None):
    hidden = (torch.zeros(1, BATCH, HIDDEN), torch.zeros(1, BATCH, HIDDEN))
    for i in range(0, WINDOWS * BPTT, BPTT):
        model.zero_grad()
        output, hidden = model(data[i:i + BPTT], hidden)     # no repackage_hidden(hidden)
        loss = F.cross_entropy(output.view(-1, VOCAB), data[i + 1:i + 1 + BPTT].reshape(-1))
        loss.backward(retain_graph=True)                    # needed to run at all
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.1)
        if keep_losses is not None:
            keep_losses.append(loss)


@pytest.mark.parametrize("where", ["block", "function"])
def test_an_lstm_tuple_state_gets_the_carried_state_fix(where):
    torch.manual_seed(0)
    model = LstmLM()
    data = torch.randint(0, VOCAB, (WINDOWS * BPTT + 1, BATCH))
    with memprof.track(model) as prof:
        if where == "block":   # the end check names it from this frame
            hidden = (torch.zeros(1, BATCH, HIDDEN), torch.zeros(1, BATCH, HIDDEN))
            for i in range(0, WINDOWS * BPTT, BPTT):
                model.zero_grad()
                output, hidden = model(data[i:i + BPTT], hidden)
                loss = F.cross_entropy(output.view(-1, VOCAB),
                                       data[i + 1:i + 1 + BPTT].reshape(-1))
                loss.backward(retain_graph=True)
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-0.1)
        else:                  # the probe names it while _train ran
            _train(model, data)
    found = [f for f in prof.findings if f.kind == "retained_graph"]
    assert len(found) == 1, [(f.holder, f.fix) for f in found]
    f = found[0]
    assert any(p.endswith("hidden[0]") for p in f.evidence["paths"]), f.evidence["paths"]
    assert "detach the state carried across steps (`h = h.detach()`)" in f.fix, f.fix
    assert "container" not in f.fix, f.fix


def test_a_list_of_losses_beside_the_state_still_gets_the_container_fix():
    """Tensors of earlier steps kept by index: a container that grows, whatever else it
    holds (here the carried state too)."""
    torch.manual_seed(0)
    model = LstmLM()
    data = torch.randint(0, VOCAB, (WINDOWS * BPTT + 1, BATCH))
    losses = []
    with memprof.track(model) as prof:
        _train(model, data, keep_losses=losses)
    fixes = [f.fix for f in prof.findings if f.kind == "retained_graph"]
    assert any("in the container" in fix for fix in fixes), fixes

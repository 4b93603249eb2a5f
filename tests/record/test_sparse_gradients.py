"""A sparse gradient (nn.Embedding(sparse=True) with SparseAdam) has no storage of its own:
its values and indices hold it. They read "other" and gradients 0."""
import torch

import memprof


def test_a_sparse_gradients_values_and_indices_are_gradients():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(1000, 64, sparse=True)
    opt = torch.optim.SparseAdam(list(emb.parameters()), lr=1e-2)
    with memprof.track(emb, opt) as prof:
        for _ in range(3):
            opt.zero_grad()
            emb(torch.randint(0, 1000, (16, 20))).square().mean().backward()
            opt.step()
    grad = emb.weight.grad
    held = grad._values().nbytes + grad._indices().nbytes   # 320 rows of 64 floats + indices
    at_end = prof.breakdown("category", at="end")
    assert at_end["gradients"] == held, at_end
    assert at_end["other"] < held
    assert prof.breakdown("category")["gradients"] > 0      # at the peak too

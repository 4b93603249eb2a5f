"""Buggy loops: each a classic memory or schedule bug, written the way people write it, in a
loop otherwise like the correct ones. Each function returns (profile, bytes the bug pins),
the bytes computed from the loop's shapes (float32: 4 bytes an element)."""
from __future__ import annotations

import collections

import torch
import torch.nn as nn
import torch.nn.functional as F

from corpus_common import F32, loader, tracked
from corpus_correct import VAE, MnistNet, vae_loss

D, H, C, B, STEPS = 16, 32, 4, 8, 6


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))


def batches(n: int = STEPS, batch: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, D, generator=g), torch.randint(0, C, (batch,), generator=g))
            for _ in range(n)]


def loss_accumulated_as_tensor():
    """mnist's train() with `train_loss += loss` (vae/main.py sums loss.item()): every step's
    graph hangs off the running total. The total is one scalar, summed in place."""
    torch.manual_seed(0)
    model = MnistNet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    train_loader = loader(torch.randn(96, 1, 14, 14), torch.randint(0, 10, (96,)), batch_size=16)
    with tracked(model, optimizer) as prof:
        train_loss = 0
        for data, target in train_loader:
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
            train_loss += loss
    return prof, F32


def outputs_kept_in_a_list():
    """vae's train() keeping every reconstruction to look at later, graph and all."""
    torch.manual_seed(0)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch, steps = 16, 6
    train_loader = loader(torch.rand(batch * steps, 1, 8, 8), batch_size=batch)
    with tracked(model, optimizer) as prof:
        reconstructions = []
        for (data,) in train_loader:
            optimizer.zero_grad()
            recon, mu, logvar = model(data)
            loss = vae_loss(recon, data, mu, logvar)
            loss.backward()
            optimizer.step()
            reconstructions.append(recon)
    # every earlier step's reconstruction (the last one is the current step's)
    return prof, (steps - 1) * batch * model.d * F32


class KeepsAttention(nn.Module):
    """Self-attention that appends its attention map to a list for visualisation (seeds/000)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads
        self.attention_maps = []

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(-1)
        self.attention_maps.append(attn)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


def attention_maps_kept():
    torch.manual_seed(0)
    batch, tokens, dim, heads, steps = 4, 12, 16, 2, 6
    model = nn.Sequential(KeepsAttention(dim, heads), nn.Flatten(), nn.Linear(tokens * dim, C))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with tracked(model, optimizer) as prof:
        for _ in range(steps):
            x, y = torch.randn(batch, tokens, dim, generator=g), torch.randint(0, C, (batch,))
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return prof, (steps - 1) * batch * heads * tokens * tokens * F32


class ElmanLM(nn.Module):
    """h_t = tanh(W_x x_t + W_h h_{t-1}); logits = W_o h_t, unrolled over a short window."""

    def __init__(self, vocab=20, hidden=16):
        super().__init__()
        self.embed, self.w_x = nn.Embedding(vocab, hidden), nn.Linear(hidden, hidden)
        self.w_h, self.out = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, vocab)
        self.vocab = vocab

    def forward(self, x, h):
        logits = []
        for x_t in self.embed(x).unbind(0):
            h = torch.tanh(self.w_x(x_t) + self.w_h(h))
            logits.append(self.out(h))
        return torch.stack(logits), h


def hidden_state_not_detached():
    """word_language_model's default path (hand-written update through `p.data`) without
    repackage_hidden(): backward then needs retain_graph=True to run at all, and every
    window's graph, saved activations included, stays reachable from `hidden`."""
    torch.manual_seed(0)
    vocab, hidden_size, bptt, batch, steps, lr = 20, 16, 5, 4, 6, 0.1
    model = ElmanLM(vocab, hidden_size)
    data = torch.randint(0, vocab, (steps * bptt + 1, batch))
    with tracked(model) as prof:
        hidden = torch.zeros(batch, hidden_size)
        for i in range(0, steps * bptt, bptt):
            model.zero_grad()
            output, hidden = model(data[i:i + bptt], hidden)
            loss = F.cross_entropy(output.view(-1, vocab), data[i + 1:i + 1 + bptt].reshape(-1))
            loss.backward(retain_graph=True)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
    # It keeps of every window the embedding output (saved by W_x through its per-step views)
    # and each step's tanh output (saved by tanh, W_h and W_o), plus the initial zeros and the
    # last window's log-softmax (the targets are views of `data`, made before tracking).
    return prof, (steps * 2 * bptt * batch * hidden_size + batch * hidden_size
                  + bptt * batch * vocab) * F32


def retain_graph_left_in():
    """super_resolution's train() with `loss.backward(retain_graph=True)` left over from
    debugging: the last graph and all its saved activations live on until `loss` is rebound."""
    from corpus_correct import SuperResolutionNet
    torch.manual_seed(0)
    model = SuperResolutionNet()
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch, size = 8, 8
    train_loader = loader(torch.rand(6 * batch, 1, size, size),
                          torch.rand(6 * batch, 1, 2 * size, 2 * size), batch_size=batch)
    with tracked(model, optimizer) as prof:
        for inp, target in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(inp), target)
            loss.backward(retain_graph=True)
            optimizer.step()
    px = batch * size * size
    # saved by the last graph: the input, the ReLU outputs of conv1-3 (16, 16, 8 channels),
    # the pixel-shuffled output and the target (each 2x2 upscaled: 4 px)
    return prof, px * (1 + 16 + 16 + 8 + 4 + 4) * F32


def ema_with_autograd_on():
    """EMA weights kept in a dict and updated without torch.no_grad(): each average is a new
    tensor whose graph reaches the model's parameters and every earlier average."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    decay = 0.99
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    with tracked(model, optimizer) as prof:
        for x, y in batches():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            for name, p in model.named_parameters():
                ema[name] = decay * ema[name] + (1 - decay) * p
    # No activation is pinned (backward released them); the graph holds the float64 scalars
    # that each multiplication wrapped as a tensor: decay and 1 - decay per parameter and
    # update, except the first update's `decay * ema[name]` (no graph yet).
    n_params = len(list(model.parameters()))
    return prof, n_params * (2 * STEPS - 1) * 8


def metrics_dict_holding_tensors():
    """Per-step metrics logged into a dict of lists, the loss and logits as tensors."""
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with tracked(model, optimizer) as prof:
        metrics = collections.defaultdict(list)
        for x, y in batches():
            optimizer.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            metrics["loss"].append(loss)
            metrics["logits"].append(logits)
            metrics["accuracy"].append((logits.argmax(1) == y).float().mean().item())
    return prof, (STEPS - 1) * (F32 + B * C * F32)


def closure_capturing_the_graph():
    """Deferred logging: a closure per step that will print the batch's confidence later; it
    captures the step's output tensor, and the graph with it."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def confidence_later(out):
        return lambda: out.softmax(-1).max(-1).values.mean().item()

    with tracked(model, optimizer) as prof:
        deferred_logs = []
        for x, y in batches():
            optimizer.zero_grad()
            out = model(x)
            F.cross_entropy(out, y).backward()
            optimizer.step()
            deferred_logs.append(confidence_later(out))
    return prof, (STEPS - 1) * B * C * F32


FEATURE_CACHE: dict = {}


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(D, H), nn.ReLU())
        self.head = nn.Linear(H, C)

    def forward(self, x, key):
        f = self.features(x)
        FEATURE_CACHE[key] = f          # "reuse them for the retrieval metric"
        return self.head(f)


def global_feature_cache():
    """Features cached in a module-level dict keyed by batch, with their graphs."""
    FEATURE_CACHE.clear()
    torch.manual_seed(0)
    model = Backbone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with tracked(model, optimizer) as prof:
        for i, (x, y) in enumerate(batches()):
            optimizer.zero_grad()
            F.cross_entropy(model(x, i), y).backward()
            optimizer.step()
    FEATURE_CACHE.clear()
    return prof, (STEPS - 1) * B * H * F32


def validate_keeping_predictions(model, data) -> list:
    """Validation without torch.no_grad() that returns the raw outputs: each keeps the graph
    of its forward pass, and that graph its saved activations."""
    model.eval()
    predictions = [model(x) for x, _ in data]
    model.train()
    return predictions


def validation_without_no_grad_keeping_predictions():
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    val_data = batches(2, seed=5)
    with tracked(model, optimizer) as prof:
        val_predictions = []
        for step, (x, y) in enumerate(batches()):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if step % 2 == 0:
                val_predictions.extend(validate_keeping_predictions(model, val_data))
    # validations after steps 0, 2 and 4 (in steps 1, 3 and 5): every batch's ReLU output,
    # saved by the second Linear (its input, the batch, existed before tracking), and the
    # outputs kept from before the last step (the last step's are current)
    return prof, (3 * len(val_data) * B * H + 2 * len(val_data) * B * C) * F32


def predictions_concatenated_across_batches():
    """torch.cat of every batch's class probabilities for an epoch-level metric, without
    detach: one growing tensor whose graph reaches every step's softmax, and each softmax
    keeps its output saved for a backward that never comes."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with tracked(model, optimizer) as prof:
        all_probabilities = torch.empty(0, C)
        for x, y in batches():
            optimizer.zero_grad()
            out = model(x)
            F.cross_entropy(out, y).backward()
            optimizer.step()
            all_probabilities = torch.cat([all_probabilities, out.softmax(-1)])
    # every step's softmax output (the concatenation itself is the current step's)
    return prof, STEPS * B * C * F32


def scheduler_stepped_before_optimizer():
    """The scheduler stepped between backward and optimizer.step() (seeds/002)."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    with tracked(model, optimizer) as prof:
        for x, y in batches():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            scheduler.step()
            optimizer.step()
    return prof, 0


def warmup_counted_in_micro_steps():
    """seeds/004: gradient accumulation 4 and a warmup of 8 meant as optimizer steps, but the
    scheduler is stepped once per micro-batch: the warmup ends 4x too early."""
    model = mlp()
    accum, warmup = 4, 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    with tracked(model, optimizer) as prof:
        for i, (x, y) in enumerate(batches(4 * accum)):
            (F.cross_entropy(model(x), y) / accum).backward()
            scheduler.step()
            if (i + 1) % accum == 0:
                optimizer.step()
                optimizer.zero_grad()
    return prof, 0

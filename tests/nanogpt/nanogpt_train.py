"""A nanoGPT-style character-level GPT trained by a hand-written loop (random weights and
data, CPU, small): gradient accumulation (loss / accum), a cosine LR with linear warmup set by
hand on each param_group, AdamW with decay / no-decay groups, clip_grad_norm_, an evaluation
under no_grad with model.eval()/model.train(), a torch.save checkpoint and `.item()` logging.
`--bug` adds one mistake of /work/shared/seeds at a time. Run as a script (`memprof run`) or
imported (`build`, `train`)."""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 65


class SelfAttention(nn.Module):
    def __init__(self, d, heads, block):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.tril(torch.ones(block, block)).view(1, 1, block, block))
        self.history = None   # a list: seeds/000's attention maps kept for a plot, not detached

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = F.softmax(att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf")), dim=-1)
        if self.history is not None and self.training:
            self.history.append(att)
        return self.proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d, heads, block):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, block)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Returns (logits, loss), loss None without targets, as nanoGPT's model does."""

    def __init__(self, block=16, layers=2, heads=2, d=32):
        super().__init__()
        self.block = block
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList([Block(d, heads, block) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.wte.weight            # weight tying
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def batch(batch_size=8, block=16):
    """A random batch as `memprof recommend --batch-fn` takes it: model(**batch)."""
    return {"idx": torch.randint(0, VOCAB, (batch_size, block)),
            "targets": torch.randint(0, VOCAB, (batch_size, block))}


def get_lr(it, warmup, total, lr, min_lr):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > total:
        return min_lr
    ratio = (it - warmup) / (total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-iters", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eval-interval", type=int, default=4)
    ap.add_argument("--eval-iters", type=int, default=1)
    ap.add_argument("--ckpt-interval", type=int, default=6)
    ap.add_argument("--out-dir", default="out")
    ap.add_argument("--track", action="store_true",
                    help="train inside the script's own memprof.track block")
    ap.add_argument("--bug", default="none",
                    choices=["none", "keep_loss", "warmup_micro", "accum_change",
                             "accum_change_rescaled", "accum_change_same_batch",
                             "attn_history"])
    return ap.parse_args(argv)


def build():
    torch.manual_seed(0)
    model = GPT()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95))


def train(model, opt, args):
    """The loop; returns the logged losses (floats, or the bug's kept tensors)."""
    data = torch.randint(0, VOCAB, (4000,))
    train_data, val_data = data[:3600], data[3600:]

    def get_batch(split):
        d = train_data if split == "train" else val_data
        ix = torch.randint(len(d) - model.block, (args.batch_size,))
        return (torch.stack([d[i:i + model.block] for i in ix]),
                torch.stack([d[i + 1:i + 1 + model.block] for i in ix]))

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {s: sum(model(*get_batch(s))[1].item() for _ in range(args.eval_iters))
               / args.eval_iters for s in ("train", "val")}
        model.train()
        return out

    os.makedirs(args.out_dir, exist_ok=True)
    lossi, accum, micro, peak = [], args.accum, 0, args.lr
    if args.bug == "attn_history":
        for b in model.blocks:
            b.attn.history = []
    x, y = get_batch("train")
    for it in range(args.max_iters):
        if args.bug.startswith("accum_change") and it == args.max_iters // 2:
            accum *= 2                      # the effective batch doubles, the LR does not
            if args.bug == "accum_change_rescaled":
                peak *= 2                   # ... unless it is scaled with it (correct)
            if args.bug == "accum_change_same_batch":
                args.batch_size //= 2       # seeds/001: half the micro-batch, same samples
        if it % args.eval_interval == 0:
            losses = estimate_loss()
            print(f"iter {it}: train {losses['train']:.4f} val {losses['val']:.4f}")
        if it > 0 and it % args.ckpt_interval == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": it},
                       os.path.join(args.out_dir, "ckpt.pt"))
        lr = get_lr(it, args.warmup, args.max_iters, peak, peak / 10)
        for m in range(accum):
            if args.bug == "warmup_micro":  # warmup and decay counted in micro-steps
                lr = get_lr(micro, args.warmup, args.max_iters, peak, peak / 10)
            if m == 0 or args.bug == "warmup_micro":
                for g in opt.param_groups:
                    g["lr"] = lr
            micro += 1
            _, loss = model(x, y)
            loss = loss / accum
            x, y = get_batch("train")
            loss.backward()
            if args.bug == "keep_loss":     # the graph of every micro-step kept for logging
                lossi.append(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.bug != "keep_loss":
            lossi.append(loss.item() * accum)
        print(f"iter {it}: loss {loss.item() * accum:.4f} lr {lr:.2e}")
    return lossi


def main(argv=None):
    args = parse(argv)
    model, opt = build()
    if not args.track:
        train(model, opt, args)
        return
    import memprof
    with memprof.track(model, optimizer=opt, health=True) as prof:
        train(model, opt, args)
    print("FINDINGS", sorted((f.kind, f.holder) for f in memprof.findings(prof)))


if __name__ == "__main__":
    main()

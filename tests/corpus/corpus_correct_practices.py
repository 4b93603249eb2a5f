"""Correct loops of common practice: framework trainers (Hugging Face, Lightning), gradient
accumulation with loss scaling and a warmup counted in optimizer steps, EMA weights, and a
validation pass with and without torch.no_grad(). memprof must find nothing in any of them."""
from __future__ import annotations

import copy
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import memprof
from corpus_common import loader, tracked

D, H, C, B = 16, 32, 4, 8


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C))


def batches(n: int, batch: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, D, generator=g), torch.randint(0, C, (batch,), generator=g))
            for _ in range(n)]


# --------------------------------------- huggingface/transformers: Trainer on a config-built GPT-2
# (examples/pytorch/language-modeling/run_clm.py's Trainer call, tiny config, random tokens)
def huggingface_trainer():
    import transformers
    from memprof.integrations.huggingface import MemprofCallback
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (24, 16))]
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=os.path.join(out, "hf"), max_steps=4, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=2,
            logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
        cb = MemprofCallback(os.path.join(out, "prof"), health=True)
        transformers.Trainer(model=model, args=args, train_dataset=data,
                             callbacks=[cb]).train()
        return memprof.load(cb.path)


# ------------------------- Lightning-AI/pytorch-lightning: LightningModule + Trainer.fit (README)
def lightning_fit():
    try:
        import lightning.pytorch as pl
        from memprof.integrations.lightning import MemprofCallback
    except ImportError:
        import pytorch_lightning as pl
        from memprof.integrations.lightning import MemprofCallback

    class LitClassifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    x, y = zip(*batches(8))
    data = loader(torch.cat(x), torch.cat(y), batch_size=B)
    with tempfile.TemporaryDirectory() as out:
        cb = MemprofCallback(os.path.join(out, "prof"), health=True)
        trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[cb])
        trainer.fit(LitClassifier(), data)
        return memprof.load(cb.path)


# ----- PyTorch AMP recipe (docs: "Automatic Mixed Precision examples", gradient accumulation),
# with the warmup of seeds/004 counted in optimizer steps, as it should be
def accumulation_with_scaler():
    model = mlp()
    accum, steps = 4, 5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warmup = 3
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup))   # s counts optimizer steps
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    data = batches(accum * steps)
    with tracked(model, optimizer) as prof:
        for i, (x, y) in enumerate(data):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y) / accum
            scaler.scale(loss).backward()
            if (i + 1) % accum == 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
    return prof


# ----------------- EMA of the weights (the update of timm's ModelEmaV2 / torch.optim.swa_utils)
def ema_weights():
    model = mlp()
    ema = copy.deepcopy(model).requires_grad_(False)
    decay = 0.99
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with tracked(model, optimizer) as prof:
        for x, y in batches(6):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.mul_(decay).add_(p, alpha=1 - decay)
        (x, y), = batches(1, seed=9)
        with torch.no_grad():
            (ema(x).argmax(1) == y).float().mean().item()    # evaluate the averaged weights
    return prof


def validate_no_grad(model, data) -> tuple[float, torch.Tensor]:
    """pytorch/examples imagenet/main.py's validate(): eval mode, no_grad, numbers out, and the
    predictions concatenated (they carry no graph)."""
    model.eval()
    total, preds = 0.0, []
    with torch.no_grad():
        for x, y in data:
            out = model(x)
            total += F.cross_entropy(out, y, reduction="sum").item()
            preds.append(out.argmax(1))
    model.train()
    return total, torch.cat(preds)


def validate_with_grad(model, data) -> float:
    """A validation pass written without torch.no_grad(): wasteful (each batch builds a graph)
    but nothing outlives the batch, so nothing is pinned."""
    model.eval()
    total = 0.0
    for x, y in data:
        total += F.cross_entropy(model(x), y, reduction="sum").item()
    model.train()
    return total


def training_with_validation(validate):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    val_data = batches(3, seed=5)
    history = []
    with tracked(model, optimizer) as prof:
        for step, (x, y) in enumerate(batches(6)):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            if step % 2 == 1:
                history.append(validate(model, val_data))
    return prof


def validation_with_no_grad():
    return training_with_validation(validate_no_grad)


def validation_without_no_grad():
    return training_with_validation(validate_with_grad)

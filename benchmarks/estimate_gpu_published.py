"""GPU section of the estimate accuracy benchmark: memprof's estimates vs published GPU memory.

No GPU is used. Each row reproduces a training setup whose GPU memory was published, with enough
detail to rebuild it: the model is built from its config on the meta device (random weights,
nothing downloaded), memprof estimates the step for the GPU the source names
(`memprof.plan.estimate.Estimator(..., gpu=...)`; fake tensors, CUDA kernel rules of that GPU),
and the estimate is set against the published figure. Every published number below is quoted
from its source (SOURCES: repository, file, commit, and what exactly was measured); a setup
that memprof cannot model (8-bit optimizers, bitsandbytes quantization, multi-GPU) is listed
as left out, not approximated.

The models are the ones the sources ran, not today's library stand-ins: lit-gpt trained its own
model code behind Lightning Fabric (benchmarks/litgpt_replica.py), and the 2022 BERT run had
transformers 4.15's attention on PyTorch 1.10 (benchmarks/bert_2022_replica.py). Each replica's
docstring names the source files and commits it follows and what about them holds memory.

What is compared with what:
* nvidia-smi / NVML "memory used" (source hf-v100) = CUDA context and kernel modules + the
  caching allocator's reserved memory (cached blocks included) + what libraries allocate
  outside it. memprof's figure: the estimated reserved peak of the run (the largest of the
  first step and the steady step with optimizer state and gradients existing) + the context
  size the same source measured on the same machine (1343 MiB). The error of the reserved part
  alone (published - 1343 MiB vs the estimated reserved peak) is reported too.
* torch.cuda.max_memory_allocated (source litgpt-a100) = the allocated peak in the caching
  allocator's blocks: memprof's figure is the allocator model's allocated peak of the estimated
  stream (largest of first, steady and accumulating micro-steps); the requested bytes are in
  the JSON (estimated_requested_gb).
* A published fit / OOM at a micro-batch (litgpt-a100) is compared with `memprof.recommend`'s
  largest fitting micro-batch (`Plan.max_micro_batch`: reserved <= total - CUDA context
  default - 5 % margin, `memprof.plan.gpus.usable_bytes`).

    python benchmarks/estimate_gpu_published.py   # -> benchmarks/results/estimate_gpu_published.*
    python benchmarks/estimate_accuracy.py --gpu-published     # the same
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from _results import machine as _machine, save

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2 ** 20
COMMAND = "python benchmarks/estimate_gpu_published.py"

# ------------------------------------------------------------------------------ sources
SOURCES = {
    "hf-v100": {
        "citation": "huggingface/transformers, docs/source/en/perf_train_gpu_one.mdx (commit "
                    "0016acf7ef421c7fe8eff7945de52c71896c3b01), sections 'Vanilla Training' .. "
                    "'Adafactor'; rendered at https://huggingface.co/docs/transformers/v4.21.0/"
                    "perf_train_gpu_one. The vanilla figure and the 1343 MB context also in "
                    "docs/source/en/model_memory_anatomy.md (commit "
                    "249ef8164cfbd8e288c2f6d8395539b9e90e8300).",
        "gpu": "v100-16gb",
        "hardware": "Tesla V100-SXM2 16 GB (nvidia-smi in the doc: 16160MiB, driver 460.91.03, "
                    "CUDA 11.2), January 2022 (transformers Trainer, PyTorch of that time)",
        "measured": "NVML memory used after trainer.train() returns, printed as "
                    "'GPU memory occupied: {info.used//1024**2} MB' (so MiB): CUDA context and "
                    "kernels + PyTorch's reserved (cached) memory; the Python kernel restarted "
                    "between experiments",
        "context_quote": "torch.ones((1, 1)).to(\"cuda\") -> 'GPU memory occupied: 1343 MB.'",
        "context_mib": 1343,
        "setup": "AutoModelForSequenceClassification bert-large-uncased (2 labels), 512 random "
                 "sequences of length 512, Trainer defaults (AdamW 'adamw_hf', weight decay 0, "
                 "max_grad_norm 1.0, model.zero_grad() keeping gradients between steps); "
                 "replica (benchmarks/bert_2022_replica.py): the self-attention of transformers "
                 "v4.15.0 (extended mask always added, in the parameters' dtype) and PyTorch "
                 "1.10's softmax, whose backward kept its input (pytorch/pytorch #64000, fixed "
                 "in 1.11 by #65242/#66018)",
    },
    "litgpt-a100": {
        "citation": "Lightning-AI/litgpt, tutorials/resource-tables.md (commit "
                    "4839345a97a0a90bc5f2361664b04d665c9a0e89), section 'Finetuning with LoRA "
                    "on 1 GPU' (Last updated 10/20/2023, Lit-GPT commit 8641822); the script is "
                    "finetune/lora.py with lit_gpt/{model,lora,rmsnorm,config,utils}.py "
                    "(Lightning-AI/lit-gpt, read at the measured commit 8641822b and at "
                    "b96a57082c18fd55fabdbb7b75dba1b26c83009e) and the Fabric wrapper of lightning "
                    "2.1.0.rc0 (the table's version; the same at the commit lit-gpt pins, "
                    "71aed751f7f0ca8422ddca256e602099070f490b): src/lightning/fabric/"
                    "wrappers.py + plugins/precision/half.py.",
        "gpu": "a100-40gb",
        "hardware": "NVIDIA A100-SXM4-40GB, driver 525.125.06, PyTorch 2.1.0+cu121",
        "measured": "'Max GPU RAM' = the script's 'Memory used: "
                    "{torch.cuda.max_memory_allocated() / 1e9:.02f} GB' (decimal GB, allocated "
                    "peak, no context, no cache)",
        "setup": "--precision bf16-true (bf16 weights, no autocast), LoRA r=8, alpha=16, "
                 "dropout=0.05 on query and value (trainable parameters as the table states), "
                 "torch.optim.AdamW (lr 3e-4, weight decay 0.01), batch 128 = micro-batch x "
                 "gradient accumulation, Alpaca: the first iteration is forced to contain the "
                 "longest training sample (phi-1.5: 1044, StableLM Alpha: 1034, Llama 2: 1304 "
                 "tokens, as the table states) and a batch is padded to its longest sample; "
                 "replica (benchmarks/litgpt_replica.py): lit-gpt's own GPT at 8641822 (fused "
                 "qkv, LoRAQKVLinear with one dropout, conv1d lora_B and zero_pad, rope with "
                 "float32 cos/sin, RMSNorm without upcast), LM head in 128-position chunks, "
                 "Fabric's bf16-true output cast to float32 logits, chunked cross-entropy on "
                 "them, logits alive until after the optimizer step",
    },
}

LEFT_OUT = [
    "hf-v100: the two 8-bit Adam rows (bitsandbytes Adam8bit, 13085 MB and 5363 MB): "
    "bitsandbytes is not installed here, its 8-bit optimizer state is not modelled.",
    "litgpt-a100: the bnb.nf4 / bnb.nf4-dq rows (4-bit quantized weights: not modelled), the "
    "Falcon 40B rows (OOM at every setting; its bf16 weights alone, about 80 GB, exceed the "
    "card: not estimated), the Adapter / Adapter v2 rows (lit-gpt's adapter modules: not rebuilt "
    "in litgpt_replica) and the multi-GPU (FSDP) rows.",
    "Throughput / FLOP figures of any source: this benchmark is about memory.",
]


# ------------------------------------------------------------------------------ models
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def bert_large():
    """bert-large-uncased for sequence classification, built from its sizes, with the
    self-attention of January 2022 (bert_2022_replica: transformers v4.15's eager attention,
    always adding the extended mask, and PyTorch 1.10's softmax that kept its input for
    backward)."""
    from transformers import BertConfig, BertForSequenceClassification
    from bert_2022_replica import use_2022_attention
    cfg = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                     num_attention_heads=16, intermediate_size=4096, hidden_act="gelu",
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                     max_position_embeddings=512, type_vocab_size=2, num_labels=2,
                     attn_implementation="eager")
    with torch.device("meta"):
        model = BertForSequenceClassification(cfg)
    use_2022_attention(model)
    model.train()

    def make_batch(b):
        return {"input_ids": torch.randint(100, 30000, (b, 512)),
                "labels": torch.zeros(b, dtype=torch.long)}, None

    return model, make_batch, lambda out, _targets: out.loss


#: the longest Alpaca training sample of each model's tokenizer, as the table states
LITGPT_LONGEST = {"phi-1.5": 1044, "stablelm-alpha-3b": 1034, "llama-2-7b": 1304,
                  "llama-2-13b": 1304}


def litgpt_model(name, rmsnorm_upcast=False):
    """The lit-gpt model of the resource table as lit-gpt itself built and trained it
    (litgpt_replica: its own GPT with fused qkv and LoRA r=8 on query and value, bf16-true
    behind Fabric's float32 output cast, chunked LM head and cross-entropy, logits kept alive
    by the training loop), on the meta device."""
    import litgpt_replica
    seq = LITGPT_LONGEST[name]
    model, cfg = litgpt_replica.build(name, seq, rmsnorm_upcast=rmsnorm_upcast)
    return model, litgpt_replica.make_batch_fn(cfg, seq), litgpt_replica.chunked_loss, seq


# ------------------------------------------------------------------------------ rows
# (setup, micro-batch, accumulation, precision, checkpointing, optimizer, quoted output)
HF_ROWS = [
    ("batch 4", 4, 1, "fp32", "none", "adamw",
     "TrainingArguments(per_device_train_batch_size=4) -> 'GPU memory occupied: 14949 MB.'",
     14949),
    ("batch 1 x 4 accumulation", 1, 4, "fp32", "none", "adamw",
     "per_device_train_batch_size=1, gradient_accumulation_steps=4 -> "
     "'GPU memory occupied: 8681 MB.'", 8681),
    ("batch 1 x 4, gradient checkpointing", 1, 4, "fp32", "every", "adamw",
     "..., gradient_checkpointing=True -> 'GPU memory occupied: 6775 MB.'", 6775),
    ("batch 4, fp16", 4, 1, "fp16", "none", "adamw",
     "per_device_train_batch_size=4, fp16=True -> 'GPU memory occupied: 13939 MB.'", 13939),
    ("batch 1 x 4, checkpointing, fp16", 1, 4, "fp16", "every", "adamw",
     "per_device_train_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing="
     "True, fp16=True -> 'GPU memory occupied: 7275 MB.'", 7275),
    ("batch 4, Adafactor", 4, 1, "fp32", "none", "adafactor",
     "per_device_train_batch_size=4, optim=\"adafactor\" -> 'GPU memory occupied: 12295 MB.'",
     12295),
    ("batch 1 x 4, checkpointing, fp16, Adafactor", 1, 4, "fp16", "every", "adafactor",
     "per_device_train_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing="
     "True, fp16=True, optim=\"adafactor\" -> 'GPU memory occupied: 4847 MB.'", 4847),
]

# model -> ({micro-batch: published GB or "OOM"}, trainable parameters the table states)
LITGPT_ROWS = {
    "phi-1.5": ({1: 4.82, 2: 6.76, 4: 10.68}, 1_572_864),
    "stablelm-alpha-3b": ({1: 9.69, 2: 12.10, 4: 16.92}, 2_097_152),
    "llama-2-7b": ({1: 21.30, 2: 29.07, 4: "OOM"}, 4_194_304),
    "llama-2-13b": ({1: 38.12, 2: "OOM", 4: "OOM"}, 6_553_600),
}
LITGPT_LABELS = {"phi-1.5": "phi-1.5 (1.4B)", "stablelm-alpha-3b": "StableLM Alpha 3B",
                 "llama-2-7b": "Llama 2 7B", "llama-2-13b": "Llama 2 13B"}


def _optimizer(name):
    if name == "adamw":
        # Trainer's 'adamw_hf' (transformers.AdamW) loops over the parameters one by one:
        # PyTorch's single-tensor AdamW keeps the same state and per-parameter temporaries
        return lambda params: torch.optim.AdamW(params, lr=5e-5, foreach=False)
    from transformers.optimization import Adafactor
    # what Trainer builds for optim="adafactor"
    return lambda params: Adafactor(params, lr=5e-5, scale_parameter=False, relative_step=False)


def run_hf(rows_out, log):
    from memprof.plan.gpus import lookup, usable_bytes
    src = SOURCES["hf-v100"]
    gpu = lookup(src["gpu"])
    usable = usable_bytes(gpu)
    model, make_batch, loss_fn = bert_large()
    from memprof.plan.estimate import Estimator
    estimators = {}
    for setup, mb, acc, prec, ckpt, opt, quote, published in HF_ROWS:
        if opt not in estimators:
            estimators[opt] = Estimator(model, make_batch, loss_fn, optimizer=_optimizer(opt),
                                        gpu=gpu)
        t = time.perf_counter()
        e = estimators[opt].step(mb, precision=prec, checkpointing=ckpt)
        # steps >= 2 keep the gradients (zero_grad without set_to_none) and the optimizer
        # state: the accumulating variant; the first step creates both
        reserved = max(e.peak_reserved, e.steady_peak_reserved, e.accumulating_peak_reserved)
        allocated = max(e.peak_allocated, e.steady_peak_allocated,
                        e.accumulating_peak_allocated)
        est_total = reserved / MiB + src["context_mib"]
        pub_reserved = published - src["context_mib"]
        row = {"source": "hf-v100", "model": "bert-large-uncased",
               "gpu": gpu.name, "setup": setup, "micro_batch": mb, "accumulation": acc,
               "precision": prec, "checkpointing": ckpt, "optimizer": opt,
               "seq_len": 512, "quote": quote,
               "published": published, "published_unit": "MiB (nvidia-smi used)",
               "estimate": round(est_total, 1),
               "estimate_what": "estimated reserved peak + the source's 1343 MiB context",
               "error": est_total / published - 1,
               "published_reserved_part_mib": pub_reserved,
               "estimated_reserved_mib": round(reserved / MiB, 1),
               "estimated_allocated_mib": round(allocated / MiB, 1),
               "reserved_part_error": (reserved / MiB) / pub_reserved - 1,
               "memprof_fits_published_micro_batch": reserved <= usable,
               "kernel_rules": e.kernel_rules, "estimate_wall_s": round(time.perf_counter() - t,
                                                                        2)}
        rows_out.append(row)
        log(f"hf-v100 {setup:45s} published {published} MiB, estimated {est_total:.0f} MiB "
            f"({row['error']:+.1%})")


def allocator_blocks_peak(e) -> int:
    """The allocated peak as torch.cuda.max_memory_allocated counts it: the caching allocator's
    block sizes (requests rounded up to 512 B, and a block's unsplit remainder: a large-pool
    block is split only when more than 1 MiB would remain; c10/cuda/CUDACachingAllocator.cpp),
    from the allocator model's replay of each variant of the step."""
    from memprof.plan.allocator import simulate
    from memprof.plan.streams import VARIANTS, step_stream
    return max(simulate(step_stream(e.profile, v), return_timeline=False).peak_allocated
               for v in VARIANTS)


def run_litgpt(rows_out, fits_out, log):
    import memprof
    from memprof.plan.estimate import Estimator
    from memprof.plan.gpus import lookup, usable_bytes
    src = SOURCES["litgpt-a100"]
    gpu = lookup(src["gpu"])
    for name, (published, trainable) in LITGPT_ROWS.items():
        model, make_batch, loss_fn, seq = litgpt_model(name)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if n_train != trainable:
            raise SystemExit(f"{name}: {n_train} trainable parameters, the source states "
                             f"{trainable}: the rebuilt model is not the published one")
        est = Estimator(model, make_batch, loss_fn, optimizer="adamw", gpu=gpu)
        for mb, pub in published.items():
            if pub == "OOM":
                continue
            t = time.perf_counter()
            e = est.step(mb, precision="fp32")     # bf16 weights, no autocast = bf16-true
            requested = max(e.peak_allocated, e.steady_peak_allocated,
                            e.accumulating_peak_allocated)
            allocated = allocator_blocks_peak(e)
            reserved = max(e.peak_reserved, e.steady_peak_reserved,
                           e.accumulating_peak_reserved)
            row = {"source": "litgpt-a100", "model": LITGPT_LABELS[name], "gpu": gpu.name,
                   "setup": f"LoRA, batch {mb} x {128 // mb} accumulation, bf16-true",
                   "micro_batch": mb, "accumulation": 128 // mb, "precision": "bf16-true",
                   "checkpointing": "none", "optimizer": "adamw", "seq_len": seq,
                   "trainable_params": n_train,
                   "quote": f"| {LITGPT_LABELS[name]} | None | {mb} | {trainable:,} | "
                            f"{pub:.2f} GB |",
                   "published": pub, "published_unit": "GB (max_memory_allocated / 1e9)",
                   "estimate": round(allocated / 1e9, 2),
                   "estimate_what": "estimated allocated peak in allocator blocks (what "
                                    "max_memory_allocated counts)",
                   "estimated_requested_gb": round(requested / 1e9, 2),
                   "error": allocated / 1e9 / pub - 1,
                   "estimated_reserved_gb": round(reserved / 1e9, 2),
                   "kernel_rules": e.kernel_rules,
                   "estimate_wall_s": round(time.perf_counter() - t, 2)}
            rows_out.append(row)
            log(f"litgpt {LITGPT_LABELS[name]:18s} mb {mb}: published {pub} GB, estimated "
                f"{allocated / 1e9:.2f} GB ({row['error']:+.1%})")
        t = time.perf_counter()
        plan = memprof.recommend(model=model, batch=make_batch, loss=loss_fn,
                                 optimizer="adamw", gpu=gpu, effective_batch=128,
                                 precisions=["fp32"], policies=["none"])
        mx = plan.max_micro_batch(precision="fp32", checkpointing="none")
        fit = [m for m, p in published.items() if p != "OOM"]
        oom = [m for m, p in published.items() if p == "OOM"]
        lo, hi = max(fit), (min(oom) - 1 if oom else None)
        fits_out.append({"source": "litgpt-a100", "model": LITGPT_LABELS[name],
                         "gpu": gpu.name, "published_fits": fit, "published_oom": oom,
                         "published_max_interval": [lo, hi], "memprof_max_micro_batch": mx,
                         "usable_bytes": usable_bytes(gpu),
                         "inside": mx >= lo and (hi is None or mx <= hi),
                         "recommend_wall_s": round(time.perf_counter() - t, 2)})
        log(f"litgpt {LITGPT_LABELS[name]:18s} max micro-batch: published "
            f"[{lo}, {hi if hi is not None else '-'}], memprof {mx}")


#: the RMSNorm variant: lit-gpt "Half precision fixes" (PR #606, commit 6178c7cc, 2023-10-24)
#: made RMSNorm compute on a float32 copy; the table names 8641822 (2023-10-16), before it
RMSNORM_VARIANT = ("lit-gpt RMSNorm after PR #606 (commit 6178c7cc, 2023-10-24: float32 "
                   "upcast of the input, kept for backward); the table names commit 8641822, "
                   "which predates it")


def run_litgpt_rmsnorm_variant(out, log):
    """The Llama 2 rows again with RMSNorm as lit-gpt #606 changed it (the only model-code
    change between the table's commit and the next weeks that alters what backward keeps for
    these models): which lit-gpt the Llama rows agree with."""
    from memprof.plan.estimate import Estimator
    from memprof.plan.gpus import lookup
    gpu = lookup(SOURCES["litgpt-a100"]["gpu"])
    for name in ("llama-2-7b", "llama-2-13b"):
        published = LITGPT_ROWS[name][0]
        model, make_batch, loss_fn, seq = litgpt_model(name, rmsnorm_upcast=True)
        est = Estimator(model, make_batch, loss_fn, optimizer="adamw", gpu=gpu)
        for mb, pub in published.items():
            if pub == "OOM":
                continue
            allocated = allocator_blocks_peak(est.step(mb, precision="fp32"))
            out.append({"model": LITGPT_LABELS[name], "micro_batch": mb, "published": pub,
                        "estimate": round(allocated / 1e9, 2),
                        "error": allocated / 1e9 / pub - 1})
            log(f"variant {LITGPT_LABELS[name]:18s} mb {mb}: published {pub} GB, estimated "
                f"{allocated / 1e9:.2f} GB ({out[-1]['error']:+.1%})")


def slopes(rows) -> list:
    """Where a source published one setup at two or more micro-batches: the memory per extra
    sample (activations) and the rest (weights, gradients, optimizer state, context), published
    vs estimated - which part of the error grows with the batch."""
    groups: dict = {}
    for r in rows:
        key = (r["source"], r["model"], r["precision"], r["checkpointing"], r["optimizer"])
        groups.setdefault(key, []).append(r)
    out = []
    for (source, model, prec, ckpt, opt), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["micro_batch"])
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        n = b["micro_batch"] - a["micro_batch"]
        pub = (b["published"] - a["published"]) / n
        est = (b["estimate"] - a["estimate"]) / n
        out.append({"source": source, "model": model, "precision": prec, "checkpointing": ckpt,
                    "optimizer": opt, "micro_batches": [a["micro_batch"], b["micro_batch"]],
                    "unit": "MiB" if source == "hf-v100" else "GB",
                    "published_per_sample": round(pub, 3), "estimated_per_sample": round(est, 3),
                    "per_sample_error": est / pub - 1,
                    "published_rest": round(a["published"] - a["micro_batch"] * pub, 3),
                    "estimated_rest": round(a["estimate"] - a["micro_batch"] * est, 3),
                    "rest_error": (a["estimate"] - a["micro_batch"] * est)
                    / (a["published"] - a["micro_batch"] * pub) - 1})
    return out


def machine() -> dict:
    return _machine(device="cpu (no GPU: estimates model the GPU each source names; published "
                           "figures are quoted, not measured here)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "estimate_gpu_published"))
    args = ap.parse_args(argv)
    _quiet()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows, fits = [], []
    run_hf(rows, log)
    run_litgpt(rows, fits, log)
    variant: list = []
    run_litgpt_rmsnorm_variant(variant, log)
    wall = time.perf_counter() - t0

    lines = ["# memprof estimates vs published GPU memory measurements (no GPU here: every "
             "memprof figure is an ESTIMATE; every published figure is quoted from its source)",
             f"# machine: {machine()}",
             f"# command: {COMMAND}",
             ""]
    for key, s in SOURCES.items():
        lines += [f"[{key}] {s['citation']}",
                  f"    hardware: {s['hardware']}",
                  f"    measured: {s['measured']}",
                  f"    setup:    {s['setup']}"]
        if "context_quote" in s:
            lines.append(f"    context:  {s['context_quote']}")
    lines += ["",
              "hf-v100: published = nvidia-smi used (MiB); estimate = memprof's reserved peak + "
              "the 1343 MiB context the source measured; 'reserved part' = published - 1343 vs "
              "memprof's reserved peak alone. litgpt-a100: published = max_memory_allocated "
              "(GB = 1e9 B); estimate = memprof's allocated peak in allocator blocks (rounded "
              "requests and unsplit remainders, as max_memory_allocated counts them).",
              "",
              f"{'source':12s} {'model':18s} {'setup':44s} {'published':>10s} "
              f"{'estimate':>10s} {'error':>7s} {'reserved part':>22s}"]
    for r in rows:
        unit = "MiB" if r["source"] == "hf-v100" else "GB"
        fmt = (lambda v: f"{v:.0f} {unit}") if unit == "MiB" else (lambda v: f"{v:.2f} {unit}")
        extra = (f"{r['published_reserved_part_mib']:.0f} vs {r['estimated_reserved_mib']:.0f} "
                 f"{r['reserved_part_error']:+.1%}") if r["source"] == "hf-v100" else ""
        lines.append(f"{r['source']:12s} {r['model']:18s} {r['setup']:44s} "
                     f"{fmt(r['published']):>10s} {fmt(r['estimate']):>10s} "
                     f"{r['error']:+7.1%} {extra:>22s}")
    lines += ["", "largest micro-batch that fits (memprof.recommend, Plan.max_micro_batch) vs the "
                  "published fit / OOM:"]
    for f in fits:
        lo, hi = f["published_max_interval"]
        pub = (f"fits at {f['published_fits']}, OOM at {f['published_oom']} -> max in "
               f"[{lo}, {hi}]") if hi is not None else \
            f"fits at {f['published_fits']}, no OOM published -> max >= {lo}"
        lines.append(f"  {f['model']:18s} {f['gpu']}: {pub:48s} "
                     f"memprof {f['memprof_max_micro_batch']:3d}"
                     f"  {'inside' if f['inside'] else 'OUTSIDE'}")
    hf = [r for r in rows if r["source"] == "hf-v100"]
    lines.append("  hf-v100 rows: every published micro-batch ran; memprof says it fits "
                 "(reserved <= "
                 "usable) for " + f"{sum(r['memprof_fits_published_micro_batch'] for r in hf)}"
                 f" of {len(hf)}")
    per_sample = slopes(rows)
    lines += ["", "per extra sample (the slope between the smallest and largest published "
                  "micro-batch) and the rest (the fixed part: weights, gradients, optimizer "
                  "state, context), published vs estimated:"]
    for s in per_sample:
        u = s["unit"]
        lines.append(f"  {s['source']:12s} {s['model']:18s} {s['precision']:9s} "
                     f"{s['checkpointing']:5s} "
                     f"mb {s['micro_batches'][0]}..{s['micro_batches'][1]}: per sample "
                     f"{s['published_per_sample']:.2f} vs {s['estimated_per_sample']:.2f} "
                     f"{u} ({s['per_sample_error']:+.1%}); rest {s['published_rest']:.2f} vs "
                     f"{s['estimated_rest']:.2f} {u} ({s['rest_error']:+.1%})")
    lines += ["", f"variant, not in the table above: the Llama 2 rows with {RMSNORM_VARIANT}:"]
    for v in variant:
        lines.append(f"  {v['model']:18s} mb {v['micro_batch']}: published {v['published']:.2f} "
                     f"GB, estimated {v['estimate']:.2f} GB ({v['error']:+.1%})")
    within = [r for r in rows if abs(r["error"]) <= 0.10]
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines += ["",
              f"within 10 % of the published figure: {len(within)} of {len(rows)} rows; worst "
              f"{worst['error']:+.1%} ({worst['source']}, {worst['model']}, {worst['setup']}); "
              f"mean |error| {sum(abs(r['error']) for r in rows) / len(rows):.1%}",
              f"max micro-batch inside the published interval: "
              f"{sum(f['inside'] for f in fits)} of {len(fits)}",
              "kernel rules applied (per row in the JSON, kernel_rules): "
              + "; ".join(sorted({k for r in rows for k in r["kernel_rules"]})),
              "left out:"] + [f"  - {x}" for x in LEFT_OUT] + \
             [f"wall time of this benchmark: {wall:.0f} s"]
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"machine": machine(), "command": COMMAND, "sources": SOURCES,
                          "rows": rows, "fits": fits, "per_sample": per_sample,
                          "rmsnorm_variant": {"what": RMSNORM_VARIANT, "rows": variant},
                          "left_out": LEFT_OUT,
                          "within_10pct": len(within), "n_rows": len(rows),
                          "wall_s": round(wall, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

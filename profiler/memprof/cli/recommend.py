"""`memprof recommend`: what fits on a GPU (memprof.plan.search.recommend), from the shell."""
from __future__ import annotations

import argparse
import ast
from typing import Any

from .base import Command, UsageError


def _csv(s: str | None) -> list[str] | None:
    if s is None:
        return None
    out = [x.strip() for x in s.split(",") if x.strip()]
    return out or None


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """['depth=6', 'attention_backend=fused'] -> {'depth': 6, 'attention_backend': 'fused'}:
    values are Python literals where they parse as one, strings otherwise."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"--model-arg {item!r}: expected KEY=VALUE with KEY a Python "
                             "identifier (e.g. attention_backend=fused)")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key.strip()] = value
    return out


class RecommendCommand(Command):
    name = "recommend"
    help = ("what fits on a GPU: micro-batch x accumulation x checkpointing x precision, with "
            "LR/warmup advice (estimates)")
    description = ("Estimates on fake tensors (no GPU needed) which micro-batch, gradient "
                   "accumulation, activation checkpointing and precision fit the GPU for a "
                   "target effective batch, ranked by estimated samples/s; with the learning "
                   "rate and warmup for that batch and the code that applies the best option.")

    def add_arguments(self, r: argparse.ArgumentParser) -> None:
        r.add_argument("--gpu", required=True,
                       help="GPU name (see `memprof gpus`), e.g. v100-16gb")
        r.add_argument("--model", required=True,
                       help="built-in model name or package.module:factory (factory() -> "
                            "nn.Module)")
        r.add_argument("--model-arg", action="append", metavar="KEY=VALUE", default=[],
                       help="keyword for the model's constructor or factory, repeatable (e.g. "
                            "attention_backend=fused: DCAL with memprof's fused attention)")
        r.add_argument("--effective-batch", type=int, required=True,
                       help="samples per optimizer step (micro-batch x accumulation)")
        r.add_argument("--precision", action="append", metavar="P",
                       help="fp32, fp16, bf16 (repeat or comma-separate; default: all the GPU "
                            "has)")
        r.add_argument("--checkpointing", metavar="POLICIES",
                       help="comma-separated policies (default none,every,every-2,selective)")
        r.add_argument("--blocks", help="qualified name of the repeated blocks to checkpoint")
        r.add_argument("--optimizer", default="adamw", help="adamw (default), adam or sgd")
        r.add_argument("--input-shape", help="per-sample input shape for a classification "
                                             "batch, e.g. 3,224,224 (models given as "
                                             "module:factory)")
        r.add_argument("--num-classes", type=int, help="classes for --input-shape (default: "
                                                       "inferred from the model's output)")
        r.add_argument("--batch-fn", help="package.module:function, function(batch_size) -> "
                                          "(inputs, targets)")
        r.add_argument("--base-lr", type=float, help="LR of the recipe at --base-batch")
        r.add_argument("--base-batch", type=int, help="batch size --base-lr was tuned for")
        r.add_argument("--lr", type=float,
                       help="the LR you use: warn if far from the scaled one")
        r.add_argument("--warmup-steps", type=int,
                       help="warmup in micro-steps (batches): converted to optimizer steps")
        r.add_argument("--no-confirm", action="store_true",
                       help="skip the confirming estimate at each boundary (faster)")
        r.add_argument("--all", action="store_true", help="show every option, not a summary")
        r.add_argument("--json", action="store_true", help="print the plan as JSON")
        r.add_argument("--html", metavar="FILE",
                       help="also write the plan as a self-contained HTML page (memory against "
                            "micro-batch per precision and checkpointing, the GPU's usable "
                            "line, the best option marked)")

    def run(self, args: argparse.Namespace) -> int:
        from rich.console import Console

        from ..plan.gpus import NoGPUError, lookup
        from ..plan.search import recommend
        from ..report.plan import print_plan, search_progress
        try:
            lookup(args.gpu)   # before the search: an unknown or absent GPU is one line
        except NoGPUError as err:
            raise UsageError(f"--gpu {args.gpu}: {err}") from None
        precisions = None
        if args.precision:
            precisions = [p for s in args.precision for p in _csv(s)]
        if (args.base_lr is None) != (args.base_batch is None):
            raise UsageError("--base-lr and --base-batch go together")
        if args.model and ":" in args.model and args.input_shape is None \
                and args.batch_fn is None:
            raise UsageError(f"--model {args.model}: give --input-shape (e.g. 3,224,224) or "
                             "--batch-fn")
        kw = dict(model=args.model, model_kwargs=parse_model_args(args.model_arg),
                  batch=args.batch_fn, optimizer=args.optimizer, gpu=args.gpu,
                  effective_batch=args.effective_batch, precisions=precisions,
                  policies=_csv(args.checkpointing), base_lr=args.base_lr,
                  base_batch=args.base_batch, lr=args.lr, warmup_steps=args.warmup_steps,
                  input_shape=args.input_shape, num_classes=args.num_classes,
                  confirm=not args.no_confirm, blocks=args.blocks)
        with search_progress(Console(stderr=True)) as progress:
            plan = recommend(progress=progress, **kw)
        if args.json:
            print(plan.to_json())
        else:
            print_plan(plan, Console(), all_options=args.all)
        if args.html:
            from ..report import export
            Console(stderr=True).print(f"wrote {export(plan, args.html)}")
        return 0


COMMAND = RecommendCommand()

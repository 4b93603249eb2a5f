"""`memprof recommend`: what fits on a GPU (memprof.plan.search.recommend), from the shell."""
from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Any

from .base import (Command, UsageError, at_least_one, at_least_zero, check_export,
                   positive_number)


def _csv(text: str | None, option: str, what: str) -> list[str] | None:
    """An option's comma-separated list as the Python API reads one string
    (memprof.plan.errors.comma_list), None when not given or holding no name; an empty item
    ('none,,every') is the one line naming `option`."""
    if text is None:
        return None
    from ..plan.errors import PlanInputError, comma_list
    try:
        return comma_list(text, option, what) or None
    except PlanInputError as e:
        raise UsageError(str(e)) from None


#: the option of each planning input an error can name only once the model is built
_OPTION_OF = {"precisions": "--precision", "blocks": "--blocks", "input shape": "--input-shape"}


#: the shell's spellings of Python's constants (`use_bn=false` reached the factory as the
#: string 'false', which is true: the plan was silently for the other model)
_CONSTANTS = {"true": True, "false": False, "none": None, "null": None}


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """['depth=6', 'attention_backend=fused'] -> {'depth': 6, 'attention_backend': 'fused'}:
    values are Python literals where they parse as one (true/false/none/null in any case
    too), strings otherwise."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"--model-arg {item!r}: expected KEY=VALUE with KEY a Python "
                             "identifier (e.g. attention_backend=fused)")
        raw = raw.strip()
        if raw.lower() in _CONSTANTS:
            value = _CONSTANTS[raw.lower()]
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
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
                       help="GPU name (see `memprof gpus`), e.g. v100-16gb; required")
        from ..models import MODELS
        r.add_argument("--model", required=True,
                       help=f"a built-in model ({', '.join(MODELS)}; see memprof.models) or "
                            "module:factory, factory(**model args) -> nn.Module, imported "
                            "with the current directory on the path as `python -m` does "
                            "(e.g. mymodels:build for build() in ./mymodels.py), or "
                            "path/to/file.py:factory; required")
        r.add_argument("--model-arg", action="append", metavar="KEY=VALUE", default=[],
                       help="keyword for the model's constructor or factory, repeatable (e.g. "
                            "attention_backend=fused: DCAL with memprof's fused attention); "
                            "the value as a Python literal (6, 0.1, [2, 4], True; true/false/"
                            "none as well), else a string; default: none (the model's own "
                            "defaults)")
        r.add_argument("--effective-batch", type=at_least_one, metavar="N",
                       help="samples per optimizer step (micro-batch x accumulation); default: "
                            "the batch function's own batch size (its first parameter's "
                            "default, as in def batch(batch_size=32))")
        r.add_argument("--precision", action="append", metavar="P",
                       help="fp32, fp16, bf16 (repeat or comma-separate; default: all the GPU "
                            "has; a model built in half precision: its own; checked "
                            "against the GPU first)")
        r.add_argument("--checkpointing", metavar="POLICIES",
                       help="comma-separated checkpointing policies: none, every, every-k "
                            "such as every-2, selective (default: none,every,every-2,"
                            "selective, those the model has blocks for; an empty value is "
                            "refused)")
        r.add_argument("--blocks", metavar="NAMES",
                       help="qualified name of the repeated blocks to checkpoint, e.g. "
                            "encoder.layer (several comma-separated); default: the model's "
                            "repeated blocks, found automatically "
                            "(memprof.plan.checkpoint.find_blocks)")
        r.add_argument("--gpus", type=int, metavar="N",
                       help="plan one rank of a data-parallel job on N GPUs (the world size); "
                            "--effective-batch is then the global batch, N x micro-batch x "
                            "accumulation, and the LR advice scales for it; default: one "
                            "GPU")
        r.add_argument("--strategy", metavar="S",
                       help="with --gpus (default ddp): ddp (everything replicated), zero1 "
                            "(optimizer state sharded), zero2 = fsdp-grad-op (+ gradients), "
                            "zero3 = fsdp-full = fsdp (+ parameters, all-gathered per block); "
                            "see memprof.plan.distributed")
        r.add_argument("--nodes", type=int, metavar="M",
                       help="with --gpus: the GPUs are spread over M nodes (default 1); "
                            "communication then crosses the network")
        r.add_argument("--layout", metavar="L",
                       help="with --gpus: how each rank holds its model states: torch "
                            "(default; what the printed torch code allocates: DDP + autocast "
                            "over fp32 weights, FSDP2 with fp32 shards) or zero-paper "
                            "(DeepSpeed's 2 + 2 + 12 bytes per parameter over each stage); "
                            "see memprof.plan.rank_layout")
        r.add_argument("--optimizer", default="adamw", metavar="NAME",
                       help="adamw (default), adam or sgd")
        r.add_argument("--input-shape", metavar="SHAPE",
                       help="per-sample input shape for a classification batch, e.g. "
                            "3,224,224, for a model given as module:factory; default: none "
                            "(such a model then needs --batch-fn)")
        r.add_argument("--num-classes", type=int, metavar="N",
                       help="classes for --input-shape, an integer (default: inferred from "
                            "the model's output)")
        r.add_argument("--batch-fn", metavar="MODULE:FUNCTION",
                       help="how a batch of your model looks: function(batch_size) returns "
                            "(inputs, targets) or inputs alone, with random tensors of the "
                            "real shapes and dtypes; inputs a tensor (model(x)), a tuple "
                            "(model(*x)) or a dict (model(**x), e.g. input_ids and labels for "
                            "a Hugging Face model). No loss is needed: the model's own "
                            "outputs.loss is used when it returns one, else cross-entropy "
                            "(integer targets), MSE (float targets) or a stand-in scalar; "
                            "default: a built-in model's own; a module:factory model needs "
                            "this or --input-shape")
        r.add_argument("--base-lr", type=positive_number, metavar="LR",
                       help="LR of the recipe at --base-batch, a number > 0; with "
                            "--base-batch the plan scales it to the effective batch "
                            "(default: no LR advice)")
        r.add_argument("--base-batch", type=at_least_one, metavar="N",
                       help="batch size --base-lr was tuned for, a whole number >= 1 "
                            "(default: none; goes with --base-lr)")
        r.add_argument("--lr", type=positive_number, metavar="LR",
                       help="the LR you use, a number > 0: warn if far from the scaled one "
                            "(needs --base-lr and --base-batch; default: not checked)")
        r.add_argument("--warmup-steps", type=at_least_zero, metavar="N",
                       help="warmup in micro-steps (batches), a whole number >= 0: converted "
                            "to optimizer steps (default: no warmup advice)")
        r.add_argument("--no-confirm", action="store_true",
                       help="skip the confirming estimates (of the recommended option, and of "
                            "each boundary the batch model interpolates): faster; every "
                            "figure is then the batch model's (default: they run)")
        r.add_argument("--workers", type=at_least_one, metavar="N",
                       help="processes estimating side by side (default: the usable cores; "
                            "1: all in this one)")
        r.add_argument("--all", action="store_true",
                       help="show every option (default: a summary, per precision and policy "
                            "the largest micro-batch that fits and the next one up)")
        r.add_argument("--json", action="store_true",
                       help="print the plan as JSON (default: tables and the code)")
        r.add_argument("--html", metavar="FILE",
                       help="also write the plan as a self-contained HTML page (memory against "
                            "micro-batch per precision and checkpointing, the GPU's usable "
                            "line, the best option marked); FILE ends in .html (.json: the "
                            "plan's JSON); default: none written")

    def leaves_fast(self, args: argparse.Namespace) -> bool:
        return ":" not in args.model and not args.batch_fn   # no module of the user's ran

    def run(self, args: argparse.Namespace) -> int:
        """With the current directory first on the import path (as `python -m` puts it), so
        that --model / --batch-fn name modules next to where the command is typed (a
        `path/to/file.py:factory` puts its folder there too); the path as it was after."""
        before = list(sys.path)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            return self._run(args)
        finally:
            sys.path[:] = before

    def _effective_batch(self, args: argparse.Namespace) -> int:
        """--effective-batch, or the batch function's own batch size; else why it is needed."""
        if args.effective_batch is not None:
            return args.effective_batch
        if args.batch_fn is None:
            raise UsageError(f"--effective-batch: required (samples per optimizer step): "
                             f"--model {args.model} has no batch size of its own; give e.g. "
                             "--effective-batch 32")
        from ..plan.workloads import own_batch_size
        n = own_batch_size(args.batch_fn)
        if n is None:
            raise UsageError(f"--effective-batch: required (samples per optimizer step): "
                             f"--batch-fn {args.batch_fn} has no default batch size; give "
                             "e.g. --effective-batch 32, or define it as "
                             "def batch(batch_size=32)")
        return n

    @staticmethod
    def _distributed(args: argparse.Namespace):
        """--gpus / --strategy / --nodes / --layout -> a memprof.plan.distributed spec, or
        None."""
        if args.gpus is None:
            for flag, value in (("--strategy", args.strategy), ("--nodes", args.nodes),
                                ("--layout", args.layout)):
                if value is not None:
                    raise UsageError(f"{flag} {value}: give --gpus N too (the world size)")
            return None
        from ..plan.distributed import data_parallel
        from ..plan.errors import PlanInputError
        try:
            return data_parallel(args.strategy or "ddp", args.gpus,
                                 1 if args.nodes is None else args.nodes,
                                 args.layout or "torch")
        except PlanInputError as e:
            raise UsageError(f"--{e}") from None

    @staticmethod
    def _precisions(args: argparse.Namespace, gpu) -> list[str] | None:
        """--precision as a list, each checked against the GPU before the model is built, or
        the one line naming --precision."""
        if not args.precision:
            return None
        from ..plan.precision import not_planned
        out = []
        for given in args.precision:
            names = _csv(given, "--precision", "precisions such as fp32,fp16")
            if names is None:   # "$UNSET": not the default
                raise UsageError(f"--precision {given!r}: expected comma-separated precisions "
                                 "such as fp32,fp16; leave the option out for the default "
                                 "(those the GPU has)")
            for p in names:
                why = not_planned(gpu, p, "--precision")
                if why:
                    raise UsageError(why)
            out += names
        return out

    def _run(self, args: argparse.Namespace) -> int:
        from rich.console import Console

        from ..plan.gpus import NoGPUError, lookup
        from ..plan.search import recommend
        from ..report.plan import print_plan, search_progress
        try:
            gpu = lookup(args.gpu)   # before the search: an unknown or absent GPU is one line
        except NoGPUError as err:
            raise UsageError(f"--gpu {args.gpu}: {err}") from None
        precisions = self._precisions(args, gpu)
        from ..plan.search import DEFAULT_POLICIES
        policies = _csv(args.checkpointing, "--checkpointing",
                        f"policies such as {','.join(DEFAULT_POLICIES)}")
        if args.checkpointing is not None and policies is None:   # "$UNSET": not the default
            raise UsageError(f"--checkpointing {args.checkpointing!r}: expected comma-separated "
                             "policies such as none,every; leave the option out for the "
                             f"default ({','.join(DEFAULT_POLICIES)})")
        from ..plan.checkpoint import parse_policy
        for p in policies or []:
            try:
                parse_policy(p, "--checkpointing")
            except ValueError as e:
                raise UsageError(str(e)) from None
        from ..plan.checkpoint import BLOCK_NAMES
        if args.blocks is not None and _csv(args.blocks, "--blocks", BLOCK_NAMES) is None:
            # get_submodule('') is the model: its own children were checkpointed
            raise UsageError(f"--blocks {args.blocks!r}: expected {BLOCK_NAMES}; leave the "
                             "option out for the blocks found automatically")
        if (args.base_lr is None) != (args.base_batch is None):
            raise UsageError("--base-lr and --base-batch go together")
        if args.lr is not None and args.base_lr is None:
            raise UsageError(f"--lr {args.lr}: needs --base-lr and --base-batch (the recipe's "
                             "learning rate and the batch it was tuned for) to be checked")
        if args.input_shape is not None and args.batch_fn is not None:
            raise UsageError(f"--input-shape {args.input_shape}: not used with --batch-fn "
                             "(the batch function makes the inputs); give one of them")
        if args.model:
            from ..plan.errors import PlanInputError
            from ..plan.workloads import check_model_spec
            try:
                check_model_spec(args.model)   # a wrong model is the first thing to say
            except PlanInputError as e:
                raise UsageError(str(e)) from None
        if args.model and ":" in args.model and args.input_shape is None \
                and args.batch_fn is None:
            raise UsageError(f"--model {args.model}: give --input-shape (e.g. 3,224,224) or "
                             "--batch-fn")
        if args.html:
            check_export(args.html, "--html", (".html", ".json"))
        distributed = self._distributed(args)
        effective = self._effective_batch(args)
        if distributed is not None and args.effective_batch is None and \
                effective % distributed.world_size:
            raise UsageError(f"--effective-batch: the batch function's own batch size "
                             f"{effective} is not divisible by --gpus {distributed.world_size}"
                             f" (the global batch is N x micro-batch x accumulation); give "
                             f"--effective-batch, e.g. {effective * distributed.world_size}")
        kw = dict(model=args.model, model_kwargs=parse_model_args(args.model_arg),
                  batch=args.batch_fn, optimizer=args.optimizer, gpu=args.gpu,
                  effective_batch=effective, precisions=precisions,
                  policies=policies, base_lr=args.base_lr,
                  base_batch=args.base_batch, lr=args.lr, warmup_steps=args.warmup_steps,
                  input_shape=args.input_shape, num_classes=args.num_classes,
                  confirm=not args.no_confirm, blocks=args.blocks, distributed=distributed,
                  workers=args.workers)
        from ..plan.errors import PlanInputError
        with search_progress(Console(stderr=True)) as progress:
            try:
                plan = recommend(progress=progress, **kw)
            except PlanInputError as e:   # found once the model is built (its weights,
                # its submodules, what its input takes): said as the option typed
                option = _OPTION_OF.get(e.input)
                if option is not None:
                    raise UsageError(e.said_as(option)) from None
                raise
        if args.json:
            print(plan.to_json())
        else:
            print_plan(plan, Console(), all_options=args.all)
        if args.html:
            from ..report import export
            Console(stderr=True).print(f"wrote {export(plan, args.html)}")
        # a script asking whether anything fits gets a status: 1 when nothing does
        return 1 if plan.failed or plan.best is None else 0


COMMAND = RecommendCommand()

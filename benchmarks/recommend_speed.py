"""Wall and CPU time of `memprof recommend` on the commands of issue 16, before/after a change.

    python benchmarks/recommend_speed.py                       # this tree only
    python benchmarks/recommend_speed.py --before db82b63      # + the code of a git commit
    python benchmarks/recommend_speed.py --before-tree /tmp/before/profiler --rounds 2
    python benchmarks/recommend_speed.py --before 177aba8 --after-tree /tmp/after/profiler

Each command runs as its own process (`memprof recommend ... --json`, imports and the model
build included). With a "before" side the two sides alternate within each round (the order
flips every round), so a busy machine slows both alike; CPU time (user + sys of the process
and its workers, from getrusage) is printed beside the wall time because it is less affected
by other load. The chosen plan and every combination's largest micro-batch of both sides are
compared: a speed change must not change the plan.

`--before REF` extracts profiler/memprof and tritonkernels of that commit (`git archive`) and
runs them with this installation's native module `memprof._C`. `--after-tree DIR` measures the
code under DIR as the "after" side instead of this installation (a change measured alone
while other work in the tree is unfinished).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _results import command, machine, save  # noqa: E402

SEQ = 512

#: (name, recommend arguments, target seconds from issue 16)
CASES = [
    ("dcal-vit-b16", ["--gpu", "v100-16gb", "--model", "dcal-vit-b16", "--effective-batch",
                      "16"], 12),
    ("dcal-vit-b16 fused", ["--gpu", "v100-16gb", "--model", "dcal-vit-b16", "--model-arg",
                            "attention_backend=fused", "--effective-batch", "16"], 20),
    ("bert-large seq 512", ["--gpu", "v100-16gb", "--model", "recommend_speed:bert_large",
                            "--batch-fn", "recommend_speed:bert_tokens", "--effective-batch",
                            "4"], 10),
    ("llama-7b lora (meta)", ["--gpu", "a100-80gb", "--model", "llm_factories:llama_7b_lora",
                              "--batch-fn", "llm_factories:tokens", "--effective-batch", "8",
                              "--precision", "bf16", "--checkpointing", "every"], 30),
]


# ------------------------------------------------------------------------------ workloads
def bert_large():
    """bert-large-uncased for sequence classification from its sizes, random weights (the
    model of benchmarks/estimate_gpu_published.py; memprof builds it on meta)."""
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                     num_attention_heads=16, intermediate_size=4096,
                     max_position_embeddings=SEQ, type_vocab_size=2, num_labels=2,
                     attn_implementation="eager")
    return BertForSequenceClassification(cfg)


def bert_tokens(batch_size):
    import torch
    return {"input_ids": torch.randint(100, 30000, (batch_size, SEQ)),
            "labels": torch.zeros(batch_size, dtype=torch.long)}, None


# ------------------------------------------------------------------------------ running
#: runs `memprof recommend` from a given source tree (None: the installed one)
_BOOT = """
import sys
tree = sys.argv[1]
if tree:
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not type(f).__name__.startswith("ScikitBuild")]
    sys.path.insert(0, tree)
import memprof.cli
sys.argv = ["memprof", "recommend"] + sys.argv[2:]
# the console script's way out where the tree has one (it may skip Python's finalization)
sys.exit(getattr(memprof.cli, "console_main", memprof.cli.main)())
"""


def extract_tree(ref: str, into: str) -> str:
    """profiler/memprof + tritonkernels of commit `ref`, with this install's _C -> import root."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "profiler/memprof",
                              "tritonkernels"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    import memprof._C as native
    pkg = os.path.join(into, "profiler", "memprof")
    shutil.copy(native.__file__, pkg)
    shutil.copytree(os.path.join(into, "tritonkernels"), os.path.join(pkg, "tritonkernels"))
    return os.path.join(into, "profiler")


def run_once(tree: str | None, args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE, os.path.join(ROOT, "tests", "plan")] + ([os.environ["PYTHONPATH"]]
                                                       if os.environ.get("PYTHONPATH") else [])))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _BOOT, tree or ""] + args + ["--json"],
                         capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode != 0:
        return {"wall_s": wall, "cpu_s": cpu, "error": out.stderr.strip().splitlines()[-1:]}
    plan = json.loads(out.stdout)
    return {"wall_s": wall, "cpu_s": cpu, "plan": summarize(plan)}


def summarize(plan: dict) -> dict:
    """What must not change: the best option, each combination's boundary, every peak."""
    best = plan["best"] or {}
    return {
        "best": {k: best.get(k) for k in ("precision", "checkpointing", "micro_batch",
                                          "accumulation", "peak_allocated", "peak_reserved")},
        "max_micro_batch": {f"{c['precision']}/{c['checkpointing']}": c["max_micro_batch"]
                            for c in plan["combinations"]},
        "peaks": sorted((o["precision"], o["checkpointing"], o["micro_batch"],
                         o["peak_allocated"], o["peak_reserved"]) for o in plan["options"]),
        "estimates_run": plan["estimates_run"], "plan_wall_s": plan["wall_s"],
    }


def _answer(plan: dict) -> dict:
    """A summarized plan without its run's cost (what a speed change must keep)."""
    return {k: v for k, v in plan.items() if k not in ("estimates_run", "plan_wall_s")}


def _fmt(runs: list[dict], key: str) -> str:
    vals = [r[key] for r in runs if "error" not in r]
    if not vals:
        return "failed"
    return f"{statistics.median(vals):6.1f}" + (f" ({min(vals):.1f}-{max(vals):.1f})"
                                                if len(vals) > 1 else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", metavar="REF", help="git commit to compare against")
    ap.add_argument("--before-tree", metavar="DIR",
                    help="import root (holding memprof/) of the code to compare against")
    ap.add_argument("--after-tree", metavar="DIR",
                    help="import root of the code to measure as 'after' (default: installed)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "recommend_speed"))
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.only or c[0] in args.only.split(",")]
    tmp = None
    before_tree = args.before_tree
    if args.before:
        tmp = tempfile.mkdtemp(prefix="memprof-before-")
        before_tree = extract_tree(args.before, tmp)
    sides = [("after", args.after_tree)] + ([("before", before_tree)] if before_tree else [])
    results = {name: {side: [] for side, _ in sides} for name, _, _ in cases}
    try:
        for r in range(args.rounds):
            for name, cli_args, _ in cases:
                for side, tree in (sides if r % 2 else sides[::-1]):
                    res = run_once(tree, cli_args, args.timeout)
                    results[name][side].append(res)
                    print(f"round {r + 1} {name:24s} {side:6s} wall {res['wall_s']:6.1f} s  "
                          f"cpu {res['cpu_s']:6.1f} s  {res.get('error', '')}", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    lines = [f"memprof recommend: wall and CPU seconds per command (median (min-max) of "
             f"{args.rounds} round(s)); command: {command()}",
             f"machine: {machine()}", "",
             f"{'case':24s} {'target':>6s}  {'side':6s} {'wall s':>18s}  {'cpu s':>18s}  "
             f"estimates  plan as before"]
    for name, _, target in cases:
        refs = [_answer(r["plan"]) for r in results[name].get("before", []) if "plan" in r]
        for side, _ in sides:
            runs = results[name][side]
            plan = next((r["plan"] for r in runs if "plan" in r), None)
            answers = [_answer(r["plan"]) for r in runs if "plan" in r]
            # "yes": every run's plan is one the before side gave (the before side itself can
            # vary from process to process: "before varies")
            same = "-" if not refs or plan is None else \
                ("before varies" if any(a != refs[0] for a in refs) else "-") \
                if side == "before" else ("yes" if all(a in refs for a in answers) else "NO")
            lines.append(f"{name:24s} {target:6d}  {side:6s} {_fmt(runs, 'wall_s'):>18s}  "
                         f"{_fmt(runs, 'cpu_s'):>18s}  {plan['estimates_run'] if plan else '-':>9}"
                         f"  {same}")
        for side, _ in sides:
            plan = next((r["plan"] for r in results[name][side] if "plan" in r), None)
            if plan:
                lines.append(f"    {side} best: {plan['best']}")
    text = "\n".join(lines)
    print(text)
    save(args.out, text, {"command": command(), "machine": machine(), "rounds": args.rounds,
                          "before": args.before or args.before_tree, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

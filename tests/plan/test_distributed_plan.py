"""Plans for N GPUs (memprof.plan.distributed): per-rank memory of DDP / ZeRO-1/2/3 against the
ZeRO paper's accounting and a real FSDP2 step under the fake process group, the global batch
in the LR advice, the communication model, the CLI and its one-line errors."""
import json
import os
import sys

import pytest
import torch
import torch.nn as nn

import memprof
from memprof import cli
from memprof.plan import meta_build
from memprof.plan.communication import COMM_UTILISATION, step_communication
from memprof.plan.distributed import (RankEstimator, data_parallel, strategy,
                                      zero_model_state_bytes)
from memprof.plan.errors import PlanInputError
from memprof.plan.gpus import GPUS, lookup

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import fsdp_fake_pg  # noqa: E402  (tests/plan: one rank of a real FSDP2 step, fake PG)
from blocks_net import Blocks, blocks_batch  # noqa: E402
import llm_factories  # noqa: E402

STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


def _model_state_total(ms: dict) -> int:
    return ms["parameters"] + ms["gradients"] + ms["optimizer_state"]


def test_strategy_names_aliases_and_bad_input_are_one_line():
    assert strategy("fsdp-full").name == "zero3" and strategy("FSDP").name == "zero3"
    assert strategy("fsdp-grad-op").name == "zero2" and strategy("shard_grad_op").name == "zero2"
    cases = [(lambda: strategy("zero9"), "strategy 'zero9': expected one of ddp"),
             (lambda: data_parallel("ddp", 2, 4), "more nodes than GPUs"),
             (lambda: data_parallel("ddp", 6, 4), "not divisible by nodes 4"),
             (lambda: data_parallel("ddp", 0), "gpus: expected an int >= 1"),
             (lambda: data_parallel("ddp", 8).per_rank_batch(30),
              "effective batch 30: not divisible by the world size 8")]
    for call, needle in cases:
        with pytest.raises(PlanInputError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)


class TwoLayers(nn.Module):
    """No nn.ModuleList / nn.Sequential of repeated blocks: nothing for fully_shard per block."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_fsdp_full_needs_blocks_to_wrap():
    flat = TwoLayers()
    batch = lambda b: ((torch.randn(b, 16),), torch.randint(0, 4, (b,)))  # noqa: E731
    with pytest.raises(PlanInputError) as e:
        memprof.recommend(model=flat, batch=batch, gpu="a100-80gb", effective_batch=16,
                          precisions=["bf16"], policies=["none"],
                          distributed=data_parallel("fsdp-full", 8))
    assert "strategy zero3: TwoLayers has no repeated blocks to wrap with fully_shard" \
        in str(e.value) and "\n" not in str(e.value)
    # zero2 shards no parameters: the same model plans
    plan = memprof.recommend(model=flat, batch=batch, gpu="a100-80gb", effective_batch=16,
                             precisions=["bf16"], policies=["none"], confirm=False,
                             distributed=data_parallel("zero2", 8))
    assert plan.best is not None and plan.effective_batch == 2


@pytest.fixture(scope="module")
def small_llama():
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM
    cfg = llm_factories.llama_config(layers=2, hidden=256, heads=4, ffn=512)
    model, built_on = meta_build.build(lambda: LlamaForCausalLM(cfg), {}, "small-llama")
    assert built_on == "meta"
    return model


@pytest.mark.parametrize("name", list(STAGE))
def test_model_states_per_rank_follow_the_zero_paper_at_world_64(small_llama, name):
    """Under layout="zero-paper": 2 + 2 + 12 bytes per parameter (bf16 weights and gradients;
    fp32 master, Adam's two moments), divided as each stage divides them: from a real fake
    step's allocations."""
    params = sum(p.numel() for p in small_llama.parameters())
    rank = RankEstimator(small_llama, lambda b: llm_factories.tokens(b, seq=32),
                         optimizer="adamw", gpu="a100-80gb",
                         distributed=data_parallel(name, 64, layout="zero-paper"))
    est = rank.step(1, precision="bf16", simulate=False)
    ms = rank.model_states(est)
    expected = zero_model_state_bytes(params, STAGE[name], 64)
    assert abs(_model_state_total(ms) / expected - 1) < 0.02, (ms, expected)
    # DDP's buckets are a copy of the (bf16) gradients, outside the model states
    assert ms["communication_buffers_at_end_of_backward"] == (2 * params if name in (
        "ddp", "zero1") else 0)


@pytest.mark.slow
def test_7b_llama_model_states_at_world_64_match_the_zero_paper():
    pytest.importorskip("transformers")
    model, built_on = meta_build.build(llm_factories.llama_7b, {}, "llama-7b")
    assert built_on == "meta"
    params = sum(p.numel() for p in model.parameters())
    assert params == 6_738_415_616
    rank = RankEstimator(model, lambda b: llm_factories.tokens(b, seq=16), optimizer="adamw",
                         gpu="a100-80gb", distributed=data_parallel("zero3", 64,
                                                                    layout="zero-paper"))
    est = rank.step(1, precision="bf16", simulate=False)
    for name, stage in STAGE.items():
        ms = rank.model_states(est, data_parallel(name, 64, layout="zero-paper"))
        expected = zero_model_state_bytes(params, stage, 64)
        assert abs(_model_state_total(ms) / expected - 1) < 0.02, (name, ms, expected)


def test_zero3_rank_matches_a_real_fsdp2_step_under_the_fake_process_group():
    """The zero3 rules against FSDP2 fully_shard itself (fp32, world 4): the same model-state
    bytes per rank, and the steady step's peak above them within 15 %."""
    real = fsdp_fake_pg.main_in_fresh_process(4)
    ratio = fsdp_fake_pg.compare_rank_estimate("zero3", 4, "fp32", real)
    assert abs(ratio - 1) < 0.15, (ratio, real)


def test_per_rank_memory_shrinks_with_each_stage_and_ddp_adds_its_buckets():
    """Under the default "torch" layout DDP's buckets copy its fp32 gradients (autocast keeps
    the weights in fp32)."""
    model = Blocks()
    grads_fp32 = 4 * sum(p.numel() for p in model.parameters())
    peaks = {}
    for name in STAGE:
        rank = RankEstimator(model, blocks_batch, optimizer="adamw", gpu=None,
                             distributed=data_parallel(name, 8))
        est = rank.step(8, precision="bf16")
        peaks[name] = est.steady_peak_allocated
        if name in ("ddp", "zero1"):
            assert est.by_category["communication"] == grads_fp32
    assert peaks["ddp"] > peaks["zero1"] > peaks["zero2"] > peaks["zero3"], peaks


def test_global_batch_drives_lr_advice_and_throughput():
    """Seed 002: 8 x A100, batch 256 per GPU = 2048, lr 0.1 x 2048 / 256 = 0.8."""
    plan = memprof.recommend(model=Blocks(), batch=blocks_batch, gpu="a100-80gb",
                             effective_batch=2048, precisions=["bf16"], policies=["none"],
                             optimizer="sgd", base_lr=0.1, base_batch=256, warmup_steps=8,
                             distributed=data_parallel("ddp", 8))
    assert plan.effective_batch == 256 and plan.global_batch == 2048 and plan.world_size == 8
    assert plan.lr.recommended_lr == pytest.approx(0.8)
    b = plan.best
    assert b.micro_batch * b.accumulation == 256
    assert b.samples_per_s == pytest.approx(256 * 8 / b.step_time_s)
    comm = b.communication
    assert comm["collectives"][0]["name"] == "all-reduce gradients"
    assert f"{8 * 2048} samples" in plan.warmup["note"]
    d = plan.as_dict()
    assert d["assumptions"]["distributed"]["strategy"] == "ddp"
    assert any(r.startswith("3 DDP gradient buckets") for r in
               d["assumptions"]["distributed"]["rules_applied"])


def test_communication_model_bytes_bandwidth_and_overlap():
    gpu = lookup("a100-80gb")
    S = 10 * 2**30
    ddp = step_communication(data_parallel("ddp", 8), gpu, param_bytes=S, grad_bytes=S,
                             accumulation=1, forward_s=0.0, backward_s=0.0)
    (ar,) = ddp.collectives
    assert ar.wire_bytes == int(2 * 7 / 8 * S)
    assert ar.seconds == pytest.approx(ar.wire_bytes / (300e9 * COMM_UTILISATION))
    assert ddp.exposed_s == pytest.approx(ddp.total_s)     # nothing to hide behind
    z3 = step_communication(data_parallel("zero3", 8), gpu, param_bytes=S, grad_bytes=S,
                            accumulation=1, forward_s=0.0, backward_s=0.0)
    assert z3.total_s == pytest.approx(1.5 * ddp.total_s)  # ZeRO paper: 3 vs 2 x params
    hidden = step_communication(data_parallel("ddp", 8), gpu, param_bytes=S, grad_bytes=S,
                                accumulation=4, forward_s=1.0, backward_s=10.0)
    assert hidden.exposed_s == 0.0 and hidden.total_s == pytest.approx(ddp.total_s)
    two_nodes = step_communication(data_parallel("ddp", 16, 2), gpu, param_bytes=S,
                                   grad_bytes=S, accumulation=1, forward_s=0, backward_s=0)
    assert two_nodes.bandwidth == pytest.approx(25e9 * COMM_UTILISATION)
    assert "network" in two_nodes.link
    assert all(g.link and g.network and g.link_kind for g in GPUS.values())


def _cli(capsys, *args):
    rc = cli.main(["recommend", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_plans_n_gpus_and_says_each_bad_input_in_one_line(capsys):
    base = ["--gpu", "a100-80gb", "--model", "mlp", "--precision", "bf16", "--checkpointing",
            "none", "--no-confirm"]
    rc, out, err = _cli(capsys, *base, "--effective-batch", "64", "--gpus", "8", "--strategy",
                        "fsdp-full", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["world_size"] == 8 and d["global_batch"] == 64 and d["effective_batch"] == 8
    assert d["assumptions"]["distributed"]["strategy"] == "zero3"
    assert d["best"]["communication"]["collectives"]
    rc, out, err = _cli(capsys, *base, "--effective-batch", "64", "--gpus", "4", "--nodes",
                        "2", "--strategy", "zero1")
    assert rc == 0, err
    assert "per GPU x 4 GPUs (zero1, 2 nodes) = global batch 64" in " ".join(out.split())
    assert "a MODEL" in out
    cases = [(["--effective-batch", "30", "--gpus", "8"], "not divisible by the world size 8"),
             (["--effective-batch", "32", "--gpus", "2", "--nodes", "4"],
              "--nodes 4: more nodes than GPUs"),
             (["--effective-batch", "32", "--strategy", "zero3"],
              "--strategy zero3: give --gpus N too"),
             (["--effective-batch", "32", "--gpus", "8", "--strategy", "zero9"],
              "--strategy 'zero9'")]
    for args, needle in cases:
        rc, out, err = _cli(capsys, *base, *args)
        assert rc == 2 and needle in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err

"""A model that checkpoints its own blocks (Hugging Face's gradient_checkpointing_enable(),
torch.utils.checkpoint in its forward) is estimated with the target GPU's kernels in the
recompute too: backward runs with function modes popped, so the recompute ran the CPU
kernels - non-reentrant checkpointing then raised CheckpointError (a different number of
tensors saved) and `memprof recommend` planned nothing for a LoRA model so set up."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memprof.plan.checkpoint import switch_names
from memprof.plan.estimate import estimate_step


class Block(nn.Module):
    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(a.transpose(1, 2).reshape(b, n, d))


class Net(nn.Module):
    """`own`: None (no checkpointing), "reentrant" or "non-reentrant" (its own)."""

    def __init__(self, own=None, blocks=3, d=64):
        super().__init__()
        self.own = own
        self.embed = nn.Linear(d, d)   # the blocks' input requires grad (reentrant needs it)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            if self.own is None:
                x = blk(x)
            else:
                x = checkpoint(blk, x, use_reentrant=self.own == "reentrant")
        return self.head(x.mean(1))


def _batch(b):
    return (torch.randn(b, 128, 64),), torch.randint(0, 10, (b,))


def _estimate(model, checkpointing="none", precision="fp32"):
    torch.manual_seed(0)
    return estimate_step(model, _batch, batch_size=4, gpu="a100-40gb", precision=precision,
                         checkpointing=checkpointing)


@pytest.mark.parametrize("own", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_own_checkpointing_recomputes_with_the_gpu_kernels(own, precision):
    torch.manual_seed(0)
    ours = _estimate(Net(), "every", precision)    # memprof's own policy: the reference
    torch.manual_seed(0)
    theirs = _estimate(Net(own), precision=precision)
    # every SDPA call, forward and recompute, went through the CUDA kernel rules
    assert theirs.kernel_rules == ours.kernel_rules
    assert sum(theirs.kernel_rules.values()) == 2 * 3
    assert theirs.peak_allocated == pytest.approx(ours.peak_allocated, rel=0.02)
    assert theirs.steady_peak_allocated == pytest.approx(ours.steady_peak_allocated, rel=0.02)


# ------------------------------------------------------------------ the plan says so
transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _tiny_llama(own: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=64,
                                   use_cache=False)
    model = transformers.LlamaForCausalLM(cfg)
    if own:   # the switch's name as the installed transformers has it (5.x renamed it)
        getattr(model, switch_names(model)[0])()
    return model.train()


def test_the_tiny_llama_turns_its_own_checkpointing_on_without_a_future_warning():
    """transformers 5.x deprecates gradient_checkpointing_enable() (a FutureWarning in every
    test here); the switch the installed version offers is used (checkpoint.switch_names)."""
    import warnings

    from memprof.plan.checkpoint import checkpoints_itself
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = _tiny_llama(own=True)
    assert checkpoints_itself(model)


def _tokens(b):
    ids = torch.randint(0, 128, (b, 64))
    return {"input_ids": ids, "labels": ids}


def test_an_estimate_counts_the_models_own_checkpoints_not_memprofs():
    assert _estimate(Net(), "every").own_checkpoints == 0
    assert _estimate(Net("non-reentrant")).own_checkpoints == 3
    assert _estimate(Net("reentrant"), "every").own_checkpoints == 3


def test_the_plan_of_a_self_checkpointing_model_says_so_and_wraps_no_block_twice():
    """The plan's row read 'checkpointing none' for a model that checkpoints every layer
    itself, and 'every' / 'every-2' / 'selective' were estimated on top of it (a second
    checkpoint around each layer: the same numbers, or more memory, under another name)."""
    from memprof.plan.search import recommend
    plan = recommend(_tiny_llama(own=True), batch=_tokens, gpu="a100-40gb",
                     effective_batch=8, precisions=["bf16"], workers=1, confirm=False)
    best = plan.best
    assert best.checkpointing == "none" and best.own_checkpointing
    assert "checkpointing none" not in best.label and "model's own" in best.label
    others = [c for c in plan.combinations if c.checkpointing != "none"]
    assert {c.checkpointing for c in others} == {"every", "every-2", "selective"}
    for c in others:
        assert c.model is None and "checkpoints its blocks itself" in c.skipped
    assert {o.checkpointing for o in plan.options} == {"none"}
    assert "checkpoints its blocks itself" in plan.code()          # keep it on, as estimated
    assert plan.as_dict()["best"]["own_checkpointing"] is True
    # asked for anyway: estimated, and named for what it is
    assert plan.predict(8, "bf16", "every").checkpointing_text == "model's own"
    # the same model without its own checkpointing: nothing of the kind is said
    plain = recommend(_tiny_llama(own=False), batch=_tokens, gpu="a100-40gb",
                      effective_batch=8, precisions=["bf16"], workers=1, confirm=False,
                      policies=["none", "every"])
    assert not plain.best.own_checkpointing and "checkpointing none" in plain.best.label
    every = next(c for c in plain.combinations if c.checkpointing == "every")
    assert every.skipped is None or "itself" not in every.skipped


@pytest.mark.parametrize("policies", [["every", "none", "selective"], ["every", "selective"],
                                      ["selective"]])
def test_memprofs_policies_are_skipped_whatever_the_order_the_user_gave(policies):
    """`--checkpointing every,none` (or no 'none') estimated 'every + model's own' around a
    model that checkpoints every layer itself: only policies after 'none' were skipped. Now
    the order does not matter, and without 'none' the model is estimated as it runs."""
    from memprof.plan.search import recommend
    plan = recommend(_tiny_llama(own=True), batch=_tokens, gpu="a100-40gb",
                     effective_batch=8, precisions=["bf16"], workers=1, confirm=False,
                     policies=policies)
    by_policy = {c.checkpointing: c for c in plan.combinations}
    assert set(by_policy) == set(policies) | {"none"}
    assert plan.combinations[0].checkpointing == "none" and by_policy["none"].model is not None
    for pol in set(policies) - {"none"}:
        assert by_policy[pol].model is None
        assert "checkpoints its blocks itself" in by_policy[pol].skipped
    assert {o.checkpointing_text for o in plan.options} == {"model's own"}
    assert plan.best.own_checkpointing


def test_policies_before_none_are_skipped_too_when_the_whole_batch_fits():
    from memprof.plan.search import recommend
    plan = recommend(_tiny_llama(own=False), batch=_tokens, gpu="a100-40gb",
                     effective_batch=8, precisions=["bf16"], workers=1, confirm=False,
                     policies=["every", "none"])
    every, none = (next(c for c in plan.combinations if c.checkpointing == p)
                   for p in ("every", "none"))
    assert none.model is not None and every.model is None and "already fits" in every.skipped
    # without 'none' nothing is added for a model that does not checkpoint itself
    only = recommend(_tiny_llama(own=False), batch=_tokens, gpu="a100-40gb",
                     effective_batch=8, precisions=["bf16"], workers=1, confirm=False,
                     policies=["every"])
    assert [(c.checkpointing, c.skipped) for c in only.combinations] == [("every", None)]


def test_the_max_micro_batch_line_and_the_chart_legend_say_model_s_own():
    """The plan's 'max micro-batch (with gradient accumulation)' line (and the HTML chart's
    legend) named 'bf16/none' for a model that checkpoints every layer itself."""
    import io

    from rich.console import Console

    from memprof.plan.search import recommend
    from memprof.report.plan import print_plan
    from memprof.report.plan_html import plan_html
    plan = recommend(_tiny_llama(own=True), batch=_tokens, gpu="a100-40gb",
                     effective_batch=8, precisions=["bf16"], workers=1, confirm=False,
                     policies=["none", "every"])
    out = io.StringIO()
    print_plan(plan, Console(file=out, width=200))
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("max micro-batch"))
    assert "bf16/model's own:" in line and "bf16/none" not in line
    assert "bf16/every: not estimated" in line         # memprof's policy, as it was asked
    page = plan_html(plan)
    assert "bf16, model&#x27;s own" in page or "bf16, model's own" in page
    assert "bf16, none" not in page


def test_the_plan_names_the_switch_the_installed_transformers_offers():
    """transformers 5.x deprecates gradient_checkpointing_enable() (a FutureWarning) for
    activation_checkpointing_enable(); the plan's reasons and code named the old one."""
    from memprof.plan.own_checkpointing import skip_reason
    from memprof.plan.search import recommend
    new = hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable")
    name = "activation_checkpointing_enable()" if new else "gradient_checkpointing_enable()"
    assert name in skip_reason(3)
    plan = recommend(_tiny_llama(own=True), batch=_tokens, gpu="a100-40gb",
                     effective_batch=8, precisions=["bf16"], workers=1, confirm=False,
                     policies=["none"])
    assert name in plan.code()
    if new:
        assert "gradient_checkpointing_enable" not in skip_reason(3) + plan.code()


def test_without_none_listed_the_first_policy_is_not_estimated_and_thrown_away():
    """With --checkpointing every (no 'none') around a model that checkpoints itself, the two
    estimates of 'every' were run, then dropped for the model's own: 4 estimates for 2."""
    from memprof.plan.search import recommend
    plan = recommend(_tiny_llama(own=True), batch=_tokens, gpu="a100-40gb",
                     effective_batch=8, precisions=["bf16"], workers=1, confirm=False,
                     policies=["every"])
    assert plan.estimates == 2
    every = next(c for c in plan.combinations if c.checkpointing == "every")
    assert every.model is None and "estimated as the model runs instead" in every.skipped
    assert plan.best.own_checkpointing and plan.best.checkpointing == "none"


def test_a_policy_whose_blocks_are_all_left_to_the_model_is_named_for_what_ran():
    """plan.predict(..., 'every') on a model whose Hugging Face checkpointing is on read
    'every + model's own', but checkpoint.apply leaves those blocks to the model's own
    checkpointing: memprof's policy wrapped none of them, and its code applied it anyway."""
    from memprof.plan.search import recommend
    plan = recommend(_tiny_llama(own=True), batch=_tokens, gpu="a100-40gb",
                     effective_batch=8, precisions=["bf16"], workers=1, confirm=False,
                     policies=["none"])
    every = plan.predict(8, "bf16", "every")
    assert every.checkpointing_text == "model's own", every.checkpointing_text
    assert "every" not in every.label and every.own_checkpointing
    assert every.peak_allocated == plan.predict(8, "bf16", "none").peak_allocated
    assert "memprof.checkpoint.apply" not in plan.code(every)


def test_memprofs_policy_on_top_of_an_unflagged_own_checkpoint_says_both():
    """torch.utils.checkpoint in the forward has no flag: memprof's policy wraps the blocks
    too, and 'every + model's own' is what ran."""
    assert _estimate(Net("non-reentrant"), "every").own_checkpoints == 3
    from memprof.plan.search import recommend
    plan = recommend(Net("non-reentrant"), batch=_batch, gpu="a100-40gb", effective_batch=8,
                     precisions=["fp32"], workers=1, confirm=False, policies=["none"])
    assert plan.predict(4, "fp32", "every").checkpointing_text == "every + model's own"

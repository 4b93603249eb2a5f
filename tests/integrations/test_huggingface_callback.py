"""MemprofCallback on a 3-step transformers.Trainer: a tiny GPT-2 built from a config (random
weights, no download), CPU, gradient accumulation 2."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from memprof.integrations.huggingface import MemprofCallback  # noqa: E402
from integration_checks import check_profile, retained, saved_profile  # noqa: E402

PEAK = "memprof/peak_bytes"


class LeakyGPT2(transformers.GPT2LMHeadModel):
    """Keeps every loss, graph included: the planted leak."""
    leak = False

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.leak:
            self.history.append(out.loss)
        return out


def tiny_gpt2(leak=False):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                                  n_head=2, use_cache=False)
    model = LeakyGPT2(cfg)
    model.leak, model.history = leak, []
    return model


def train(tmp_path, model, callbacks, steps=3):
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (32, 16))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
        optim="adamw_torch", dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=callbacks)
    trainer.train()
    return trainer


class Reporter(transformers.TrainerCallback):
    """Stands for a report_to integration: they are listed before the user's callbacks."""
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_trainer_run_is_profiled_saved_and_logged(tmp_path):
    model = tiny_gpt2()
    cb, reporter = MemprofCallback(tmp_path / "prof"), Reporter()
    trainer = train(tmp_path, model, [reporter, cb])
    assert cb.path == str(tmp_path / "prof" / "train.memprof")
    prof = saved_profile(str(tmp_path / "prof"))
    check_profile(prof, model)            # 3 updates of 2 micro-batches each
    assert not [f for f in prof.findings if f.kind == "retained_graph"]
    # the Trainer's loss went to the profile, one per step; the peak to the Trainer's logs
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    assert all(h[PEAK] > 0 for h in logged)
    assert [h[PEAK] for h in reporter.seen if "loss" in h] == [h[PEAK] for h in logged]
    assert max(h[PEAK] for h in logged) <= prof.peak * 1.01
    assert [(s, n) for s, n, _ in prof.run.records["logs"]] == [(0, "loss"), (1, "loss"), (2, "loss")]
    assert [round(v, 4) for *_, v in prof.run.records["logs"]] == [round(h["loss"], 4) for h in logged]


def test_the_profile_has_the_trainers_steps(tmp_path):
    """max_steps=3 saved 4 steps ("3 + partial"): the Trainer's loss bookkeeping after the
    last update (tr_loss's mean, its summary) was a trailing step. It is still recorded."""
    cb = MemprofCallback(tmp_path / "prof")
    trainer = train(tmp_path, tiny_gpt2(), [cb])
    prof = saved_profile(str(tmp_path / "prof"))
    assert trainer.state.global_step == 3
    assert len(prof.steps) == trainer.state.global_step and not prof.partial_last_step
    assert prof.steps_label == "3" and prof.steps[-1].end == prof.marker_positions("step")[-1]
    assert (prof.memory[prof.steps[-1].end:]["size"] > 0).any()     # recorded all the same


def test_kept_outputs_are_a_retained_graph(tmp_path):
    model = tiny_gpt2(leak=True)
    cb = MemprofCallback(tmp_path / "prof")
    train(tmp_path, model, [cb])
    retained(saved_profile(str(tmp_path / "prof")), "history")


class Boom(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom")


def test_a_run_that_raises_is_saved_by_the_context_manager(tmp_path):
    # on_train_end is not called when training raises: the with block finishes the profile
    with pytest.raises(RuntimeError, match="boom"):
        with MemprofCallback(tmp_path / "prof") as cb:
            train(tmp_path, tiny_gpt2(), [cb, Boom()])
    prof = saved_profile(str(tmp_path / "prof"))
    assert "boom" in prof.meta["error"]
    assert len(prof.marker_positions("step")) == 2
    assert not math.isnan(prof.peak)

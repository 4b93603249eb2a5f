"""The corpus: every loop with its source and, for a buggy one, the finding it must give."""
from __future__ import annotations

import corpus_buggy as bug
import corpus_correct as ok
import corpus_correct_practices as practice
from corpus_common import Case
from memprof.analyse.throughput import TIMING_KINDS

EX = "pytorch/examples "

CORRECT = [
    Case("mnist", EX + "mnist/main.py", ok.mnist),
    Case("word_language_model", EX + "word_language_model/main.py", ok.word_language_model),
    Case("dcgan", EX + "dcgan/main.py", ok.dcgan),
    Case("vae", EX + "vae/main.py", ok.vae),
    Case("siamese_network", EX + "siamese_network/main.py", ok.siamese_network),
    Case("time_sequence_prediction", EX + "time_sequence_prediction/train.py",
         ok.time_sequence_prediction),
    Case("super_resolution", EX + "super_resolution/main.py", ok.super_resolution),
    Case("actor_critic", EX + "reinforcement_learning/actor_critic.py", ok.actor_critic),
    Case("huggingface_trainer", "transformers Trainer, run_clm.py", practice.huggingface_trainer),
    Case("lightning_fit", "Lightning README LightningModule", practice.lightning_fit),
    Case("accumulation_with_scaler", "PyTorch AMP examples", practice.accumulation_with_scaler),
    Case("ema_weights", "timm ModelEmaV2 update", practice.ema_weights),
    Case("validation_with_no_grad", EX + "imagenet/main.py validate()",
         practice.validation_with_no_grad),
    Case("validation_without_no_grad", "validate() without no_grad",
         practice.validation_without_no_grad),
]

# name, source, loop, expected kind, holder (the finding's holder without the function's
# prefix), what the fix must say
BUGGY = [
    Case("loss_accumulated_as_tensor", "mnist train_loss += loss", bug.loss_accumulated_as_tensor,
         "retained_graph", "train_loss", ".item()"),
    Case("outputs_kept_in_a_list", "vae outputs list", bug.outputs_kept_in_a_list,
         "retained_graph", "reconstructions", ".detach()"),
    Case("attention_maps_kept", "seeds/000 attention history", bug.attention_maps_kept,
         "retained_graph", "model.0.attention_maps", ".detach()"),
    Case("hidden_state_not_detached", "word_language_model no repackage_hidden",
         bug.hidden_state_not_detached, "retained_graph", "hidden", "h.detach()"),
    Case("retain_graph_left_in", "super_resolution retain_graph=True", bug.retain_graph_left_in,
         "retain_graph", "loss", "drop retain_graph=True"),
    Case("ema_with_autograd_on", "EMA without no_grad", bug.ema_with_autograd_on,
         "retained_graph", "ema", "torch.no_grad()"),
    Case("metrics_dict_holding_tensors", "metrics dict of tensors",
         bug.metrics_dict_holding_tensors, "retained_graph", "metrics", ".item()"),
    Case("closure_capturing_the_graph", "deferred logging closures",
         bug.closure_capturing_the_graph, "retained_graph", "deferred_logs", "closure"),
    Case("global_feature_cache", "module-level feature cache", bug.global_feature_cache,
         "retained_graph", "corpus_buggy.FEATURE_CACHE", ".detach()"),
    Case("validation_without_no_grad_keeping_predictions", "validate() returning outputs",
         bug.validation_without_no_grad_keeping_predictions, "retained_graph",
         "val_predictions", "torch.no_grad()"),
    Case("predictions_concatenated_across_batches", "torch.cat of probabilities",
         bug.predictions_concatenated_across_batches, "retained_graph", "all_probabilities", "torch.no_grad()"),
    Case("scheduler_stepped_before_optimizer", "seeds/002 order",
         bug.scheduler_stepped_before_optimizer, "scheduler_before_optimizer", None,
         "optimizer.step() first"),
    Case("warmup_counted_in_micro_steps", "seeds/004 warmup",
         bug.warmup_counted_in_micro_steps, "lr_schedule_per_micro_step", None,
         "once per optimizer step"),
]

# Findings from wall-clock timing (TIMING_KINDS): the benchmark lists them in a column of their
# own, the tests leave them out (on a loaded machine they can appear in any loop).


def run(case: Case):
    """(profile, pinned bytes) of a case: correct loops return the profile only."""
    out = case.run()
    return out if isinstance(out, tuple) else (out, 0)


def short_holder(holder: str | None) -> list[str]:
    """The holder names of a finding without the function prefix ('f.<locals>.h' -> 'h')."""
    if holder is None:
        return []
    return [h.split(".<locals>.")[-1] for h in holder.split(" and ")]

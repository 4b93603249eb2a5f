"""Frees that happen at once, in an order Python chose: two runs of one step still line up (a
new-user sweep: autocast's weight casts, freed at the forward's end in an order set by their
addresses, made the batch model inexact in about half the runs; its peaks, extrapolated down,
then had Plan.predict's memory fall with the micro-batch and max_micro_batch hit the limit)."""
import numpy as np
import torch

import memprof
from memprof.plan.batch_model import SEARCH_LIMIT


def test_frees_between_two_allocations_are_ordered_by_what_they_release():
    from memprof.plan.streams import canonical_order
    #            a0  a1  f1  f0  a4  f4  a6  f6  a8
    size = np.array([5, 3, -3, -5, 2, -2, 7, -7, 4])
    token = np.array([0, 1, 1, 0, 4, 4, 6, 6, 8])
    assert canonical_order(size, token).tolist() == [0, 1, 3, 2, 4, 5, 6, 7, 8]
    swapped = [0, 1, 3, 2, 4, 5, 6, 7, 8]   # the other run: f0 came before f1
    s2, t2 = size[swapped], token[swapped]
    assert t2[canonical_order(s2, t2)].tolist() == token[canonical_order(size, token)].tolist()
    # frees before any allocation (blocks from before the step) are a run of their own
    assert canonical_order(np.array([-1, -2, 3]), np.array([5, 2, 2])).tolist() == [1, 0, 2]


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=3))


def bert_batch(batch_size=4):
    return {"input_ids": torch.randint(0, 200, (batch_size, 32)),
            "labels": torch.randint(0, 3, (batch_size,))}


def test_a_combination_estimated_later_predicts_memory_that_grows_with_the_batch():
    plan = memprof.recommend(_tiny_bert(), batch=bert_batch, gpu="1gb", overhead=0,
                             effective_batch=8, precisions=["fp32"], policies=["none"],
                             confirm=False)
    for precision in ("fp32", "bf16", "fp16"):   # each estimated now, one after the other
        curve = [plan.predict(m, precision, "every").peak_reserved for m in (8, 64, 512)]
        assert curve[0] < curve[1] < curve[2], (precision, curve)
        assert plan.max_micro_batch(precision, "every") < SEARCH_LIMIT
        assert plan._combos[(precision, "every")].model.exact, precision

"""memprof.recommend(policies=..., precisions=...) take lists of names: a value that is no
list (policies=3) read Python's "'int' object is not iterable", and an empty list failed
with a bare StopIteration (policies) or planned nothing without a word (precisions). Each is
now one line naming the parameter, before the model is built; a string is split on commas
as the command line splits it ('fp16' is one name, not its characters)."""
import pytest
import torch

import memprof
from memprof.plan.errors import PlanInputError


def _recommend(built, **kw):
    def build():
        built.append(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 2))
    return memprof.recommend(build, input_shape=(4,), gpu="t4", effective_batch=8,
                             confirm=False, workers=1, **kw)


@pytest.mark.parametrize("kw, said", [
    (dict(policies=3), r"policies: expected a list of names such as \['none', 'every'\], "
                       r"got int 3"),
    (dict(precisions=3), r"precisions: expected a list of names such as \['fp32', "
                         r"'fp16'\], got int 3"),
    (dict(policies=[]), r"policies: expected at least one name such as 'none' or 'every', "
                        r"got an empty list"),
    (dict(precisions=()), r"precisions: expected at least one name such as 'fp32' or "
                          r"'fp16', got an empty tuple"),
])
def test_no_list_or_an_empty_one_is_one_line_before_the_model_is_built(kw, said):
    built: list = []
    with pytest.raises(PlanInputError, match=rf"^{said}$"):
        _recommend(built, **kw)
    assert built == []


def test_a_bare_string_is_one_name_not_its_characters():
    built: list = []
    plan = _recommend(built, precisions="fp16", policies="none")
    assert {(o.precision, o.checkpointing) for o in plan.options} == {("fp16", "none")}
    # a tuple or any other iterable of names is a list of names too
    plan = _recommend(built, precisions=("fp32",), policies=iter(["none"]))
    assert {(o.precision, o.checkpointing) for o in plan.options} == {("fp32", "none")}


def test_one_string_of_comma_separated_names_is_split_as_the_command_line_splits_it():
    """precisions='fp16,bf16' was taken as one name ("precisions 'fp32,fp16': expected fp32,
    fp16 or bf16") while `--precision fp32,fp16` plans both."""
    built: list = []
    plan = _recommend(built, precisions="fp32, fp16", policies="none,every")
    assert {(o.precision, o.checkpointing) for o in plan.options} >= {
        ("fp32", "none"), ("fp16", "none")}
    assert {c.checkpointing for c in plan.combinations} == {"none", "every"}


@pytest.mark.parametrize("kw, said", [
    (dict(policies="none,,every"), r"policies: empty item in 'none,,every'; expected a "
                                   r"comma-separated list of names such as none,every"),
    (dict(precisions="fp32,"), r"precisions: empty item in 'fp32,'; expected a "
                               r"comma-separated list of names such as fp32,fp16"),
    (dict(precisions=""), r"precisions: expected at least one name such as 'fp32' or "
                          r"'fp16', got ''"),
    (dict(policies=" , "), r"policies: expected at least one name such as 'none' or "
                           r"'every', got ' , '"),
    (dict(blocks="0,,2"), r"blocks: empty item in '0,,2'; expected a comma-separated list of "
                          r"qualified module names such as encoder.layer"),
])
def test_an_empty_item_or_no_name_in_a_string_is_one_line(kw, said):
    built: list = []
    with pytest.raises(PlanInputError, match=rf"^{said}$"):
        _recommend(built, **kw)

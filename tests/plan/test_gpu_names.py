"""GPU names as people type them (issue 12): spellings resolve, ambiguity is said, typos get
near matches."""
import pytest

from memprof.plan.gpus import lookup


@pytest.mark.parametrize("typed, canonical", [
    ("rtx3090-24gb", "rtx-3090"), ("RTX 3090", "rtx-3090"), ("rtx3090", "rtx-3090"),
    ("A100 80GB", "a100-80gb"), ("a100-sxm4-80gb", "a100-80gb"), ("H100 SXM", "h100-80gb"),
    ("v100-sxm2-16gb", "v100-16gb"), ("T4", "t4"), ("MI300X", "mi300x"), ("rtx 4070", "rtx-4070"),
    ("L40S", "l40s"), ("RTX A6000", "rtx-a6000"), ("B200", "b200"), ("P100", "p100-16gb"),
])
def test_spellings_resolve(typed, canonical):
    g = lookup(typed)
    assert g.name == canonical and not (g.note or "")


@pytest.mark.parametrize("typed, candidates", [("a100", "a100-80gb"), ("V100", "v100-32gb")])
def test_ambiguous_names_say_which_was_chosen(typed, candidates):
    g = lookup(typed)
    assert "ambiguous" in g.note and candidates in g.note and g.name in g.note


def test_unknown_name_lists_near_matches():
    with pytest.raises(ValueError, match=r"unknown GPU 'rtx 9090'; did you mean rtx-4090"):
        lookup("rtx 9090")


def test_a_mistyped_name_offers_the_likest_first():
    """'v10-16gb' offered v100-pcie-32gb, a10g, p100-16gb, h100-pcie-80gb before v100-16gb:
    the model key's matches came before the whole name's."""
    with pytest.raises(ValueError, match=r"did you mean v100-16gb, "):
        lookup("v10-16gb")


@pytest.mark.parametrize("typed, nbytes", [("16G", 16 << 30), ("16g", 16 << 30),
                                           ("1T", 1 << 40), ("16GB", 16 * 10**9),
                                           ("16 GiB", 16 << 30)])
def test_a_capacity_with_a_single_letter_unit_is_binary(typed, nbytes):
    """`--gpu 16G` was refused by a message that offered capacities (Slurm's --mem=16G and
    docker's --memory 16g are binary)."""
    g = lookup(typed)
    assert g.generic and g.memory_bytes == nbytes


def test_a_laptop_gpus_name_is_no_capacity():
    """`3080m` is an RTX 3080 laptop GPU's name, not 3080 MiB."""
    with pytest.raises(ValueError, match=r"unknown GPU '3080m'; did you mean "):
        lookup("3080m")

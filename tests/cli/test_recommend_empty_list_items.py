"""`memprof recommend --checkpointing none,,every` (--precision fp32,,fp16, --blocks a,,b the
same) dropped the empty item without a word and planned what was left: a shell variable that
was unset (none,$EXTRA) or a typo went unseen. Each is one line naming the option, exit 2,
before the model is built."""
import pytest

from memprof import cli


def _cli(capsys, *args):
    rc = cli.main(["recommend", "--gpu", "v100-16gb", "--model", "mlp", "--effective-batch",
                   "8", "--no-confirm", "--workers", "1", "--json", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("option, given, what", [
    ("--checkpointing", "none,,every", "policies such as none,every,every-2,selective"),
    ("--checkpointing", "none,", "policies such as none,every,every-2,selective"),
    ("--checkpointing", ",every", "policies such as none,every,every-2,selective"),
    ("--precision", "fp32,,fp16", "precisions such as fp32,fp16"),
    ("--precision", "fp32, ", "precisions such as fp32,fp16"),
    ("--blocks", "net,,net", "qualified module names such as encoder.layer"),
])
def test_an_empty_item_is_one_line_naming_the_option(capsys, option, given, what):
    rc, out, err = _cli(capsys, option, given)
    assert rc == 2 and out == "", out
    assert err.strip() == (f"memprof: {option}: empty item in {given!r}; expected a "
                           f"comma-separated list of {what}"), err


def test_an_empty_blocks_is_refused_not_taken_for_the_whole_model(capsys):
    """--blocks "" checkpointed the model's own children (get_submodule('') is the model)."""
    rc, out, err = _cli(capsys, "--blocks", "")
    assert rc == 2 and out == "", out
    assert err.strip() == ("memprof: --blocks '': expected qualified module names such as "
                           "encoder.layer; leave the option out for the blocks found "
                           "automatically"), err


def test_spaces_around_items_are_still_fine(capsys):
    rc, out, err = _cli(capsys, "--checkpointing", "none, every", "--precision", "fp32 ")
    assert rc == 0, err

"""`memprof recommend --checkpointing / --precision`: what a value the command cannot plan is
said as, in one line naming the option, before the model is built."""
import pytest

from memprof import cli


def _cli(capsys, *args):
    rc = cli.main(["recommend", "--gpu", "v100-16gb", "--model", "mlp", "--effective-batch",
                   "8", "--no-confirm", "--json", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("given", ["", ",", " , "])
def test_an_empty_checkpointing_is_refused_not_taken_for_the_default(capsys, given):
    """`--checkpointing ""` (an unset shell variable) planned the default policies without a
    word, as if the option had been left out."""
    rc, out, err = _cli(capsys, "--checkpointing", given)
    assert rc == 2 and out == "", out
    assert err.strip() == (f"memprof: --checkpointing {given!r}: expected comma-separated "
                           "policies such as none,every; leave the option out for the "
                           "default (none,every,every-2,selective)"), err

"""`memprof run --capacity EVENTS`: the event log's size for a script run unmodified. A long
job filled the default 20M events and its report covered only the first steps, advising
`track(capacity=...)` - which a `memprof run` user cannot pass without editing the script."""
import json
import textwrap

import pytest

import memprof
from memprof.cli import main
from memprof.record.session import DEFAULT_CAPACITY

SCRIPT = textwrap.dedent('''
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
''')

SPAWNING = textwrap.dedent('''
    import torch
    import torch.multiprocessing as mp

    def worker(rank):
        torch.manual_seed(rank)
        model = torch.nn.Linear(16, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            model(torch.randn(4, 16)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    if __name__ == "__main__":
        mp.spawn(worker, nprocs=1)
''')


def _run(tmp_path, capsys, *options, script=SCRIPT):
    path = tmp_path / "train.py"
    path.write_text(script)
    rc = main(["run", "--json", "--autosave", "0", *options, str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("given, events", [("300", 300), ("0.3k", 300), ("3_00", 300), ("3e2", 300)])
def test_the_capacity_reaches_the_tracker(tmp_path, capsys, given, events):
    # the warning names the option too (it said "raise track(capacity=...)")
    with pytest.warns(RuntimeWarning, match=r"dropped .*; raise memprof run --capacity$"):
        rc, out, err = _run(tmp_path, capsys, "--capacity", given)
    assert rc == 0, err
    prof = memprof.load(str(tmp_path / "train.memprof"))
    assert prof.meta["capacity"] == events and prof.meta["dropped"] > 0
    assert "memprof run --capacity records more" in json.loads(out)["truncated"]


def test_the_default_capacity_records_the_whole_script(tmp_path, capsys):
    rc, out, err = _run(tmp_path, capsys)
    assert rc == 0, err
    prof = memprof.load(str(tmp_path / "train.memprof"))
    assert prof.meta["capacity"] == DEFAULT_CAPACITY and not prof.meta.get("dropped")
    assert len(prof.steps) == 20


@pytest.mark.parametrize("bad", ["0", "-5", "lots", "infM", "1.5", "_1", "5MB", "1e20k",
                                 "1e99999999999"])
def test_a_bad_capacity_is_one_line(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, capsys, "--capacity", bad)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "argument --capacity: expected a " in err and repr(bad) in err


def test_each_rank_and_each_process_the_script_starts_gets_the_capacity(tmp_path, capsys):
    from memprof.cli import build_parser, parse
    from memprof.cli.run import COMMAND
    build_parser()
    args = parse(["run", "--nproc-per-node", "2", "--capacity", "5M", "train.py"])
    assert COMMAND._memprof_options(args) == ["--capacity", "5000000"]
    args = parse(["run", "--nproc-per-node", "2", "train.py"])
    assert COMMAND._memprof_options(args) == []
    # a process the script starts (torch.multiprocessing.spawn) records with it too
    rc, _, err = _run(tmp_path, capsys, "--capacity", "400", script=SPAWNING)
    assert rc == 0, err
    child = memprof.load(str(tmp_path / "train.rank0.memprof"))
    assert child.meta["capacity"] == 400 and child.meta["dropped"] > 0

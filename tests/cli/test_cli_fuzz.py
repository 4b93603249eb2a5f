"""The command line's argument handling, fuzzed (issue 15): whatever the arguments, `memprof`
ends with an exit status (argparse's usage error, or one line of its own), never a traceback.
In-process and sampled, so it stays fast; nothing here runs a training script or a search."""
import io
import random
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import memprof
from memprof.cli import main

SUBCOMMANDS = ["run", "report", "recommend", "gpus"]   # demo: minutes, covered elsewhere
GPUS = ["v100", "nope-gpu", "", "0gb", "-5gb", "1e999gb", "[x]", "auto"]
WORDS = ["--json", "--top", "--export", "--fail-on-findings", "-o", "--output", "--gpu",
         "--model", "--model-arg", "--effective-batch", "--precision", "--checkpointing",
         "--input-shape", "--base-lr", "--base-batch", "--warmup-steps", "--all", "--help",
         "-", "--", "=", "x=1", "=y", "0", "-1", "3.5", "1e9", "nan", "[/x]", "\x00", "é",
         "missing.py", "missing.memprof", "good.memprof", "junk.memprof", "damaged.memprof",
         "dir", "out.html",
         "out.json", "out.pickle", "out.docx", "mlp", "pkg.mod:factory", ":", "fp16,bf16"]


@pytest.fixture
def files(tmp_path):
    model = torch.nn.Linear(8, 8)
    with memprof.track(model) as prof:
        model(torch.randn(4, 8)).sum().backward()
    prof.save(str(tmp_path / "good.memprof"))
    (tmp_path / "junk.memprof").write_bytes(b"PK\x03\x04" + b"\xff" * 200)
    data = bytearray((tmp_path / "good.memprof").read_bytes())
    for i in range(len(data) // 3, len(data) // 2, 7):   # inside the compressed members
        data[i] ^= 0x5A
    (tmp_path / "damaged.memprof").write_bytes(bytes(data))
    (tmp_path / "dir").mkdir()
    return tmp_path


def _argv(rng: random.Random) -> list[str]:
    cmd = rng.choice(SUBCOMMANDS + ["", "nope"])
    argv = [cmd] if cmd else []
    if cmd == "recommend":   # never a valid GPU: no search is started
        gpus = [g for g in GPUS if g != "auto" or not torch.cuda.is_available()]
        argv += ["--gpu", rng.choice(gpus[1:])]
        if rng.random() < 0.5:
            argv += ["--model", "mlp", "--effective-batch", rng.choice(["-1", "0", "8"])]
    argv += [rng.choice(WORDS) for _ in range(rng.randrange(0, 6))]
    if cmd == "report" and rng.random() < 0.5:
        argv.insert(1, rng.choice(["good.memprof", "junk.memprof", "damaged.memprof"]))
    if cmd == "run":   # never a script that exists
        argv = [a for a in argv if a not in ("dir",) and not a.endswith((".memprof", ".html"))]
        argv += ["missing.py"] if rng.random() < 0.5 else []
    return argv


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:   # argparse: usage errors (2) and --help (0)
            status = exc.code
    return status, err.getvalue()


def test_random_arguments_end_in_an_exit_status(files, monkeypatch):
    monkeypatch.chdir(files)
    rng = random.Random(15)
    statuses = set()
    for _ in range(400):
        argv = _argv(rng)
        status, err = _run(argv)
        assert isinstance(status, int), (argv, status)
        assert "Traceback" not in err, (argv, err)
        if status == 2 and not err.startswith("usage:"):
            assert err.strip().count("\n") == 0, (argv, err)   # our own errors: one line
        statuses.add(status)
    assert 2 in statuses


@pytest.mark.parametrize("argv", [
    ["report", "good.memprof", "--top", "-3"],
    ["report", "good.memprof", "--export", "dir"],
    ["report", "good.memprof", "--export", "out.docx"],
    ["report", "junk.memprof"],
    ["report", "dir"],
    ["report", "/dev/zero"],
    ["run", "dir"],
    ["run", "-o", "dir", "missing.py"],
    ["recommend", "--gpu", "nope", "--model", "mlp", "--effective-batch", "-1"],
    ["recommend", "--gpu", "[x]", "--model", "mlp", "--effective-batch", "8"],
])
def test_edge_arguments(files, monkeypatch, argv):
    monkeypatch.chdir(files)
    status, err = _run(argv)
    assert isinstance(status, int) and "Traceback" not in err, (argv, err)


@pytest.mark.parametrize("top", ["0", "-3", "x"])
def test_report_top_below_one_is_refused(files, monkeypatch, top):
    monkeypatch.chdir(files)
    status, err = _run(["report", "good.memprof", "--top", top])
    assert status == 2 and "--top: expected a whole number >= 1" in err


def test_an_unknown_option_is_said_with_the_commands_own_usage(capsys):
    """`memprof gpus --bogus` printed the top-level usage (`memprof [-h] command ...`), which
    names none of the command's options."""
    from memprof.cli import main
    for argv, usage in ((["gpus", "--bogus"], "usage: memprof gpus"),
                        (["report", "--bogus", "x.memprof"], "usage: memprof report")):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(usage) and "unrecognized arguments: --bogus" in err

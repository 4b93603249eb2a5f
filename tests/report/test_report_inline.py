"""What a REPL and a notebook show for a profile (`prof`, `memprof.load(...)` as the last line
of a cell): it was `<memprof.track.Tracker object at 0x7f...>`, nothing of the run."""
import re

import torch

import memprof
from memprof.units import fmt_bytes
from tiny_mlp import MLP


def _leaky_run(tmp_path):
    torch.manual_seed(0)
    model = MLP(16, 32, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = []
    tracker = memprof.track(model, opt, path=str(tmp_path / "run.memprof"))
    before = repr(tracker)
    with tracker as prof:
        during = repr(prof)
        for _ in range(4):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            kept.append(loss)          # a retained graph: a finding held by <locals>.kept
    return prof, before, during


def test_a_repl_shows_the_run_in_one_line(tmp_path):
    prof, before, during = _leaky_run(tmp_path)
    assert before == "<memprof.track: not started; use it as `with memprof.track(model) as " \
                     "prof:`>"
    assert re.fullmatch(r"<memprof\.track: recording, [\d,]+ events so far>", during)
    line = repr(prof)
    assert "\n" not in line and line.startswith("<memprof profile: MLP on cpu, peak ")
    assert f"peak {fmt_bytes(prof.peak)} at step " in line
    assert f"{len(prof.steps)} steps" in line and "retained_graph" in line
    assert "prof.report()" in line
    loaded = memprof.load(str(tmp_path / "run.memprof"))
    assert repr(loaded) == line   # the same run, read back


def test_a_notebook_shows_the_report_as_an_html_fragment(tmp_path):
    prof, _, _ = _leaky_run(tmp_path)
    html = prof._repr_html_()
    assert html == memprof.load(str(tmp_path / "run.memprof"))._repr_html_()
    # a fragment a notebook can put in its page: no document, no page-wide style or script
    assert html.lstrip().startswith("<pre") and html.rstrip().endswith("</pre>")
    for tag in ("<html", "<head", "<body", "<style", "<script"):
        assert tag not in html.lower()
    text = re.sub(r"<[^>]+>", "", html)
    assert "peak live memory" in text and "Findings" in text
    assert "&lt;locals&gt;" in html and "<locals>" not in text   # the holder, escaped
    assert memprof.track()._repr_html_() is None   # not run yet: the one line instead


def test_a_forked_child_says_its_parent_has_the_profile(tmp_path):
    import os
    model = MLP(16, 32, 4)
    r, w = os.pipe()
    with memprof.track(model) as prof:
        model(torch.randn(8, 16)).sum().backward()
        pid = os.fork()
        if pid == 0:   # the child leaves the block too, then tells what its repr reads
            try:
                prof.__exit__(None, None, None)
                os.write(w, repr(prof).encode())
            finally:
                os._exit(0)
    os.waitpid(pid, 0)
    os.close(w)
    child = os.read(r, 4096).decode()
    os.close(r)
    assert child == "<memprof.track: a process forked inside the block; its parent has the " \
                    "profile>", child
    assert repr(prof).startswith("<memprof profile: MLP")

"""`memprof run --health` learns the loop's optimizer at its first step: the first step's
micro-steps read no LR (the health timeline's forwards carried an empty list), so the rules
that read the LR per micro-step started at step 2 - two optimizer steps of nanoGPT's warmup
counted in micro-steps read one window, and no finding, where `memprof.track(model, opt)`
named it. The optimizers a script makes are noted as it makes them."""
import json
import subprocess
import sys
import textwrap

import memprof
import nanogpt_train

ACCUM_SCRIPT = textwrap.dedent('''
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 40))
    for it in range(3):
        for m in range(4):
            print("LR", it, opt.param_groups[0]["lr"])
            (model(torch.randn(8, 16)).pow(2).mean() / 4).backward()
            sched.step()            # warmup counted in micro-steps
        opt.step(); opt.zero_grad()
''')


def _run(tmp_path, *argv):
    return subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--health", *argv],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_every_micro_step_has_its_lr_from_the_first_step(tmp_path):
    (tmp_path / "accum.py").write_text(ACCUM_SCRIPT)
    r = _run(tmp_path, "-o", "accum.memprof", "accum.py")
    assert r.returncode == 0, r.stderr
    seen = [(int(w[1]), float(w[2])) for w in
            (line.split() for line in r.stdout.splitlines()) if w and w[0] == "LR"]
    timeline = memprof.load(str(tmp_path / "accum.memprof")).run.records["health"]["timeline"]
    recorded = [(int(ev[1]), ev[2]) for ev in timeline if ev[0] == "F"]
    assert [s for s, _ in recorded] == [s for s, _ in seen]
    assert [lrs for _, lrs in recorded] == [[lr] for _, lr in seen], recorded[:4]


def test_the_lr_per_micro_step_rule_reads_the_first_step(tmp_path):
    r = _run(tmp_path, "--json", nanogpt_train.__file__, "--out-dir", str(tmp_path / "out"),
             "--max-iters", "2", "--warmup", "4", "--bug", "warmup_micro")
    assert r.returncode == 0, r.stderr
    kinds = [f["kind"] for f in json.loads(r.stdout)["findings"]]
    assert "lr_schedule_per_micro_step" in kinds, kinds

"""`memprof run` on a script that starts its ranks itself with torch.multiprocessing.spawn
(PyTorch's DDP tutorial): the training ran in the spawned processes, which the block in the
parent never reached - the report had 0 events and 0 steps. Each process now records itself as
a torchrun rank does."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

import memprof

DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch.nn.parallel import DistributedDataParallel as DDP

    class ToyModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net1, self.relu, self.net2 = (torch.nn.Linear(10, 10), torch.nn.ReLU(),
                                               torch.nn.Linear(10, 5))

        def forward(self, x):
            return self.net2(self.relu(self.net1(x)))

    def demo_basic(rank, world_size, port):
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "localhost", port
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        torch.manual_seed(0)
        model = DDP(ToyModel())
        opt = torch.optim.SGD(model.parameters(), lr=0.001)
        for _ in range(4):
            opt.zero_grad()
            torch.nn.MSELoss()(model(torch.randn(20, 10)), torch.randn(20, 5)).backward()
            opt.step()
        print(f"rank {rank} trained")
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(demo_basic, args=(2, sys.argv[1]), nprocs=2, join=True)
""")

WORKERS_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch
    import torch.multiprocessing as mp

    def work(index, fail):
        model = torch.nn.Linear(16, 16)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
        open(f"done{index}", "w").close()
        if index == fail:
            while not all(os.path.exists(f"done{i}") for i in range(2)):
                time.sleep(0.01)   # the other one has finished: torch stops it otherwise
            raise ValueError(f"worker {index} gave up")

    if __name__ == "__main__":
        method, fail, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        if "--parent-model" in sys.argv:   # a check in the parent before the job
            torch.nn.Linear(4, 4)(torch.randn(2, 4)).sum().backward()
        for n in range(calls):
            mp.start_processes(work, args=(fail,), nprocs=2 - n, start_method=method)
""")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


def _run(tmp_path, script: str, *args, json_out: bool = False):
    (tmp_path / "train.py").write_text(script)
    return subprocess.run([sys.executable, "-m", "memprof.cli", "run", "-o", "job.memprof"]
                          + (["--json"] if json_out else []) + ["train.py", *args],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)


@pytest.mark.slow
def test_the_ranks_mp_spawn_starts_each_record_themselves(tmp_path):
    proc = _run(tmp_path, DDP_SCRIPT, _free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 trained" in proc.stdout and "rank 1 trained" in proc.stdout
    assert "memprof: rank 1 peak" in proc.stdout                # one line for rank 1
    assert "memprof: DistributedDataParallel on cpu, rank 0 of 2" in proc.stdout
    assert "memprof report job.rank*.memprof" in proc.stdout    # the parent says where
    for rank in range(2):
        prof = memprof.load(str(tmp_path / f"job.rank{rank}.memprof"))
        assert (prof.meta["rank"], prof.meta["world_size"], prof.meta["dist_backend"]) == \
            (rank, 2, "gloo")
        assert len(prof.steps) == 4
        assert prof.activations_by_module()["module.relu"] > 0
        # DDP's bucket, alive while the model is (freed with it when demo_basic returns, as
        # under python: memprof no longer holds the model to the block's end)
        assert prof.breakdown("category", at="peak")["communication"] > 0
        assert prof.breakdown("category", at="end")["parameters"] == 0
    parent = memprof.load(str(tmp_path / "job.memprof"))
    assert parent.modules == [] and len(parent.steps) == 0      # no model ran there


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_workers_without_a_process_group_are_told_apart_and_a_failure_is_kept(tmp_path,
                                                                              method):
    proc = _run(tmp_path, WORKERS_SCRIPT, method, "1", "1")
    assert proc.returncode == 1                                # as python: the worker raised
    assert "ValueError: worker 1 gave up" in proc.stderr
    ok, failed = (memprof.load(str(tmp_path / f"job.rank{i}.memprof")) for i in range(2))
    assert len(ok.steps) == len(failed.steps) == 3
    assert "error" not in ok.meta and "worker 1 gave up" in failed.meta["error"]
    assert "memprof: rank 1 peak" in proc.stdout


@pytest.mark.slow
def test_a_second_job_keeps_the_first_ones_files_and_each_job_merges(tmp_path):
    """Two start_processes calls: the second's process 0 overwrote the first's rank 0 file
    (next to the first's rank 1), and files without a process group had no rank to merge by."""
    proc = _run(tmp_path, WORKERS_SCRIPT, "spawn", "-1", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memprof report job.rank*.memprof; memprof report job.call2.rank*.memprof" in \
        proc.stdout
    first = [memprof.load(str(tmp_path / f"job.rank{i}.memprof")) for i in range(2)]
    second = memprof.load(str(tmp_path / "job.call2.rank0.memprof"))
    assert [(p.meta["rank"], p.meta["world_size"]) for p in first] == [(0, 2), (1, 2)]
    assert (second.meta["rank"], second.meta["world_size"]) == (0, 1)
    merged = subprocess.run([sys.executable, "-m", "memprof.cli", "report", "--json",
                             "job.rank0.memprof", "job.rank1.memprof"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout)["world_size"] == 2


@pytest.mark.slow
def test_json_is_one_document_and_a_closed_pipe_fails_no_process(tmp_path):
    proc = _run(tmp_path, WORKERS_SCRIPT, "spawn", "-1", "1", "--parent-model", json_out=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["events"] > 0       # the parent's; the workers' on stderr
    assert "memprof: rank 0 peak" in proc.stderr and "memprof: rank 1 peak" in proc.stderr
    # `memprof run train.py | head -1`: the reader is gone before the reports
    (tmp_path / "job.rank0.memprof").unlink()
    piped = subprocess.Popen([sys.executable, "-m", "memprof.cli", "run", "-o", "job.memprof",
                              "train.py", "spawn", "-1", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=tmp_path)
    piped.stdout.close()
    _, err = piped.communicate(timeout=240)
    assert piped.returncode == 0, err.decode()[-3000:]
    assert (tmp_path / "job.rank0.memprof").exists()


PROCESS_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def run(rank, size):
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(torch.randn(8, 10)),
                                         torch.randn(8, 1)).backward()
            for p in model.parameters():     # the tutorial's hand-written all-reduce
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= size
            opt.step()

    def init_process(rank, size, fn):
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", sys.argv[1]
        dist.init_process_group("gloo", rank=rank, world_size=size)
        fn(rank, size)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.set_start_method("spawn")
        data = torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4, num_workers=2)
        print("batches", len(list(data)))     # a DataLoader's workers: not the script's
        processes = [mp.Process(target=init_process, args=(rank, 2, run)) for rank in (1, 0)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        sys.exit(max(p.exitcode for p in processes))
""")


@pytest.mark.slow
def test_processes_the_script_starts_with_multiprocessing_process_record_themselves(tmp_path):
    """"Writing Distributed Applications with PyTorch": one mp.Process per rank. The parent's
    DataLoader workers (torch's own target) are left as they are."""
    proc = _run(tmp_path, PROCESS_SCRIPT, _free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batches 2" in proc.stdout
    assert "memprof: process 0 peak" in proc.stdout and "memprof: process 1 peak" in proc.stdout
    assert "memprof report job.rank*.memprof" in proc.stdout
    for rank in range(2):       # started in the order 1, 0: named by their process group rank
        prof = memprof.load(str(tmp_path / f"job.rank{rank}.memprof"))
        assert (prof.meta["rank"], prof.meta["world_size"]) == (rank, 2)
        assert len(prof.steps) == 3
    assert sorted(p.name for p in tmp_path.glob("*.memprof")) == \
        ["job.memprof", "job.rank0.memprof", "job.rank1.memprof"]


SUBCLASS_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.multiprocessing as mp

    def train(index, steps):
        torch.manual_seed(index)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(steps):
            model(torch.randn(8, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        print(f"trainer {index} trained {steps} steps", flush=True)

    class Trainer(mp.Process):            # the work in an overridden run(), no target
        def __init__(self, index, steps):
            super().__init__()
            self.index, self.steps = index, steps

        def run(self):
            train(self.index, self.steps)

    class Logged(mp.Process):             # run() overridden around the target it was given
        def run(self):
            print("logged starts", flush=True)
            super().run()

    class Static(mp.Process):             # run() a staticmethod: called without self
        @staticmethod
        def run():
            train(3, 2)

    if __name__ == "__main__":
        mp.set_start_method(sys.argv[1])
        processes = [Trainer(0, 3), Trainer(1, 4), Logged(target=train, args=(2, 5)), Static()]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        try:
            processes[0].start()
        except AssertionError:
            print("a second start refused", flush=True)
        sys.exit(max(p.exitcode for p in processes))
""")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_process_subclass_that_overrides_run_records_itself(tmp_path, method):
    """A Process subclass whose run() does the work (no target) was not reached: its training
    ran unrecorded. A subclass's run() around its target is recorded once, not nested."""
    proc = _run(tmp_path, SUBCLASS_SCRIPT, method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for index, steps in ((0, 3), (1, 4), (2, 5), (3, 2)):
        assert proc.stdout.count(f"trainer {index} trained {steps} steps") == 1
        assert f"memprof: process {index} peak" in proc.stdout
        prof = memprof.load(str(tmp_path / f"job.rank{index}.memprof"))
        assert len(prof.steps) == steps
        assert prof.activations_by_module()["Sequential.1"] > 0   # the ReLU output, named
    assert "logged starts" in proc.stdout and "a second start refused" in proc.stdout
    # the refused start is not counted (nor given a file)
    assert "the script ran 4 processes of its own" in proc.stdout
    # no process group: no job to merge (the merged command the parent printed failed)
    assert "one report per process (no process group: not ranks of one job): memprof report " \
        "job.rank0.memprof, memprof report job.rank1.memprof, memprof report " \
        "job.rank2.memprof, memprof report job.rank3.memprof" in " ".join(proc.stdout.split())
    assert "job.rank*.memprof" not in proc.stdout
    assert not (tmp_path / "job.rank4.memprof").exists()


STEP_ON_SCRIPT = textwrap.dedent("""
    import sys
    import multiprocessing as mp
    import torch

    def gan_step(g, d, opt_g, opt_d):         # one training step, two optimizer steps
        d(torch.randn(8, 16)).square().mean().backward()
        opt_d.step(); opt_d.zero_grad()
        d(g(torch.randn(8, 4))).square().mean().backward()
        opt_g.step(); opt_g.zero_grad()

    def train(index, steps):
        torch.manual_seed(index)
        g = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU())
        d = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt_g = torch.optim.SGD(g.parameters(), lr=0.01)
        opt_d = torch.optim.SGD(d.parameters(), lr=0.01)
        for _ in range(steps):
            gan_step(g, d, opt_g, opt_d)
        print(f"worker {index} done", flush=True)

    if __name__ == "__main__":
        mp.set_start_method(sys.argv[1])
        processes = [mp.Process(target=train, args=(i, 3 + i)) for i in range(2)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        sys.exit(max(p.exitcode for p in processes))
""")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("spec", ["gan_step", "steps_lib:gan_step"])
def test_step_on_a_function_ends_the_steps_of_the_processes_too(tmp_path, method, spec):
    """`--step-on gan_step`: a step per call in each process the script starts. Forked, the
    processes' steps were ended twice (the parent's tracker's step end, inherited, beside their
    own optimizer steps); spawned, they found their own (two per call here). The same for a
    function the script imports (`from steps_lib import gan_step`, bound before a spawned
    process could patch it)."""
    script = STEP_ON_SCRIPT
    if ":" in spec:
        definition = script[script.index("def gan_step"):script.index("def train")]
        (tmp_path / "steps_lib.py").write_text("import torch\n\n" + definition)
        script = script.replace(definition, "from steps_lib import gan_step\n\n\n")
    (tmp_path / "train.py").write_text(script)
    proc = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--step-on", spec,
                           "-o", "job.memprof", "train.py", method],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for index, steps in ((0, 3), (1, 4)):
        assert f"worker {index} done" in proc.stdout
        prof = memprof.load(str(tmp_path / f"job.rank{index}.memprof"))
        assert len(prof.steps) == steps, (method, index, len(prof.steps))
        assert prof.meta["steps_marked"] == steps



def _gan_step_definition() -> str:
    return STEP_ON_SCRIPT[STEP_ON_SCRIPT.index("def gan_step"):STEP_ON_SCRIPT.index("def train")]


ELSEWHERE = {
    # the step function bound by another module the script imports, not by the script
    "helper": ("steps_lib:gan_step", {
        "steps_lib.py": "import torch\n\n" + "{gan_step}",
        "helper.py": "import torch\nfrom steps_lib import gan_step\n\n\n" + "{train}",
    }, "from helper import train\n"),
    # a package's re-export (`mylib/__init__.py`: from .loop import gan_step): no def there
    "reexport": ("mylib:gan_step", {
        "mylib/__init__.py": "from .loop import gan_step\n",
        "mylib/loop.py": "import torch\n\n" + "{gan_step}",
    }, "from mylib import gan_step\n\n\n{train}"),
    # a method named by its last part, the script also holding another function of that name
    "method": ("gan_step", {
        "other.py": "def gan_step(*args):\n    raise AssertionError('not this one')\n",
    }, "from other import gan_step\n\n\nclass GAN:\n{method}\n\n{train_method}"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ELSEWHERE))
def test_step_on_in_a_spawned_process_reaches_every_name_of_the_function(tmp_path, case):
    """Spawned, the processes imported the script and its modules before memprof could wrap
    the function: a name another module bound (`from steps_lib import gan_step` in helper.py)
    kept the original, and a bare name was looked up as the script's global (here another
    function) instead of the method the parent resolved - their steps were 0 or two per call."""
    spec, files, head = ELSEWHERE[case]
    gan_step = _gan_step_definition()
    train = STEP_ON_SCRIPT[STEP_ON_SCRIPT.index("def train"):STEP_ON_SCRIPT.index("if __name__")]
    method = textwrap.indent(gan_step.replace("(g, d,", "(self, g, d,"), "    ")
    train_method = train.replace("gan_step(g, d,", "GAN().gan_step(g, d,")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text.format(gan_step=gan_step, train=train))
    main = STEP_ON_SCRIPT[STEP_ON_SCRIPT.index("if __name__"):]
    imports = "import sys\nimport multiprocessing as mp\nimport torch\n"
    (tmp_path / "train.py").write_text(
        imports + head.format(method=method, train_method=train_method, train=train) + "\n\n"
        + main)
    proc = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "--step-on", spec,
                           "-o", "job.memprof", "train.py", "spawn"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for index, steps in ((0, 3), (1, 4)):
        prof = memprof.load(str(tmp_path / f"job.rank{index}.memprof"))
        assert (len(prof.steps), prof.meta["steps_marked"]) == (steps, steps), (case, index)

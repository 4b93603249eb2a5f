"""recommend's speed changes keep its answers: worker processes, built-ins built on meta."""
import pytest
import torch

import memprof
from memprof.models import build_model
from memprof.plan.errors import PlanInputError
from memprof.plan.estimate import Estimator
from memprof.plan.gpus import lookup
from memprof.plan.parallel import Pool

MiB = 1 << 20
SMALL_GPU = dict(gpu="v100-16gb", overhead=lookup("v100-16gb").memory_bytes - 80 * MiB,
                 margin=0.0)


def _without_times(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k != "wall_s"}
    d["combinations"] = [{k: v for k, v in c.items() if k != "wall_s"}
                         for c in d["combinations"]]
    return d


def test_plan_from_worker_processes_equals_the_one_made_in_process():
    kw = dict(effective_batch=64, precisions=["fp16", "fp32"], policies=["none", "every"],
              **SMALL_GPU)
    here = memprof.recommend("vit-tiny", workers=1, **kw)
    forked = memprof.recommend("vit-tiny", workers=2, **kw)
    assert _without_times(forked.as_dict()) == _without_times(here.as_dict())
    assert forked.estimates == here.estimates == 2 * 4 + 1   # + the best option confirmed
    # the workers' estimates came back without their live objects; in-process ones keep them
    assert all(c.model.lo.profile.run.live is None for c in forked.combinations)
    assert all(c.model.lo.profile.run.live is not None for c in here.combinations)
    # a prediction of a forked plan is the in-process plan's prediction
    assert forked.predict(20, "fp16", "every") == here.predict(20, "fp16", "every")


def test_policies_after_none_are_skipped_when_none_fits_all_with_workers():
    plan = memprof.recommend("vit-tiny", gpu="v100-16gb", effective_batch=8,
                             precisions=["fp16", "fp32"], policies=["none", "every"], workers=2)
    skipped = {(c.precision, c.checkpointing): c.skipped for c in plan.combinations}
    assert skipped[("fp16", "none")] is None and skipped[("fp32", "none")] is None
    assert "already fits" in skipped[("fp16", "every")]
    assert "already fits" in skipped[("fp32", "every")]
    assert plan.estimates == 2 * 2 + 1     # two fits per precision, the best option confirmed
    best = plan.best
    assert best.micro_batch == 8 and best.confirmed
    assert {c.precision: c.confirmed_at for c in plan.combinations if c.model is not None} \
        == {best.precision: 8, ({"fp16", "fp32"} - {best.precision}).pop(): None}


def _broken_batch(b):
    raise RuntimeError("no data here")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_batch_function_is_one_line_from_a_worker_too(workers):
    with pytest.raises(PlanInputError, match="batch function '_broken_batch' raised "
                                             "RuntimeError: no data here"):
        memprof.recommend(build_model("mlp").model, batch=_broken_batch, gpu="v100-16gb",
                          effective_batch=8, precisions=["fp16", "fp32"], policies=["none"],
                          workers=workers)


def test_pool_runs_jobs_in_other_processes_and_in_order_of_completion_here():
    import os
    pool = Pool(lambda x: (x * x, os.getpid()), workers=2)
    for x in (3, 4):
        pool.submit(x)
    got = dict(pool.results())
    assert {x: r[0] for x, r in got.items()} == {3: 9, 4: 16}
    assert all(r[1] != os.getpid() for r in got.values())
    here = Pool(lambda x: (x + 1, os.getpid()), workers=1)
    here.submit(1)
    assert list(here.results()) == [(1, (2, os.getpid()))]


def _pid_after(job):
    import os
    import time
    time.sleep(job[1])
    return os.getpid()


def test_pool_sends_jobs_of_one_affinity_to_the_worker_that_ran_one():
    # four jobs per micro-batch, submitted in an order that first-come-first-served would
    # hand out mixed (worker 0 would get batches 2, 4, 2, 4)
    order = [(0, 2), (0, 4), (1, 4), (1, 2), (2, 2), (2, 4), (3, 4), (3, 2)]
    jobs = [(key, 0.2) for key in order]
    pool = Pool(_pid_after, workers=2, affinity=lambda job: job[0][1])
    for job in jobs:
        pool.submit(job)
    pids = {}
    for job, pid in pool.results():
        pids.setdefault(job[0][1], set()).add(pid)
    assert len(pids[2]) == len(pids[4]) == 1 and pids[2] != pids[4]


def _fail_or_die(x):
    import os
    if x == "raise":
        raise ValueError("bad input 7")
    if x == "die":
        os._exit(3)
    if x == "unpicklable":
        return lambda: x
    return x


def test_pool_raises_a_job_error_and_reports_a_dead_worker():
    from memprof.plan.parallel import WorkerDied
    pool = Pool(_fail_or_die, workers=2)
    procs = list(pool._procs)
    pool.submit("raise")
    with pytest.raises(ValueError, match="bad input 7") as raised:
        list(pool.results())
    assert "_fail_or_die" in str(raised.value.__cause__)   # the worker's traceback
    assert not any(p.is_alive() for p in procs)           # closed: its workers are gone
    pool = Pool(_fail_or_die, workers=2)
    pool.submit("unpicklable")
    with pytest.raises(RuntimeError, match="could not send back the job's result"):
        list(pool.results())
    pool = Pool(_fail_or_die, workers=2)
    pool.submit("die")
    with pytest.raises(WorkerDied, match="a worker process of the plan died"):
        list(pool.results())


def _start_a_process(x):
    import multiprocessing
    child = multiprocessing.get_context("fork").Process(target=int)
    child.start()     # a batch function's DataLoader workers: not allowed in daemonic workers
    child.join()
    return child.exitcode


def test_a_pool_job_may_start_processes_of_its_own():
    pool = Pool(_start_a_process, workers=2)
    pool.submit(1)
    assert list(pool.results()) == [(1, 0)]


@pytest.mark.parametrize("name,kwargs", [("vit-tiny", {}),
                                         ("dcal-vit-tiny", {"attention_backend": "fused"})])
def test_builtins_built_on_meta_estimate_as_built_for_real(name, kwargs):
    import torch
    real = build_model(name, **kwargs)
    with torch.device("meta"):
        meta = build_model(name, **kwargs)
    assert next(meta.model.parameters()).device.type == "meta"
    a = Estimator(real.model, real.make_batch, real.loss_fn, gpu="v100-16gb").step(
        3, precision="fp16", checkpointing="every")
    b = Estimator(meta.model, meta.make_batch, meta.loss_fn, gpu="v100-16gb").step(
        3, precision="fp16", checkpointing="every")
    assert {k: v for k, v in a.as_dict().items() if k != "wall_s"} == \
        {k: v for k, v in b.as_dict().items() if k != "wall_s"}
    plan = memprof.recommend(name, model_kwargs=kwargs, gpu="v100-16gb", effective_batch=4,
                             precisions=["fp32"], policies=["none"], confirm=False)
    assert plan.model["built_on"] == "meta"


def test_workers_must_be_a_positive_int():
    with pytest.raises(PlanInputError, match=r"workers: expected an int >= 1, got 0"):
        memprof.recommend("mlp", gpu="v100-16gb", effective_batch=8, workers=0)


def test_one_combination_runs_its_two_fits_in_two_worker_processes():
    plan = memprof.recommend("vit-tiny", effective_batch=64, precisions=["fp16"],
                             policies=["every"], workers=2, **SMALL_GPU)
    (c,) = plan.combinations
    # both estimates came back from forked workers (live objects stay there) ...
    assert c.model.lo.profile.run.live is None and c.model.hi.profile.run.live is None
    # ... and the plan is the one made in this process
    here = memprof.recommend("vit-tiny", effective_batch=64, precisions=["fp16"],
                             policies=["every"], workers=1, **SMALL_GPU)
    assert _without_times(plan.as_dict()) == _without_times(here.as_dict())


class _Counted(torch.nn.Module):
    """A classifier that notes the batch size of every forward (on any copy of it)."""
    batches: list = []

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        _Counted.batches.append(int(x.shape[0]))
        return self.fc(x)


def test_the_default_loss_rule_comes_from_the_estimates_without_a_forward_of_its_own():
    _Counted.batches = []
    plan = memprof.recommend(_Counted(), input_shape=(8,), num_classes=3, gpu="v100-16gb",
                             effective_batch=8, precisions=["fp32"], policies=["none"],
                             workers=1)
    assert plan.model["loss"] == {"rule": "cross_entropy", "output": ""}
    assert sorted(set(_Counted.batches)) == [2, 4, 8]      # the fits and the best confirmed
    assert "loss = torch.nn.functional.cross_entropy(out, y)" in plan.code()

"""MemprofCallback on a 3-step Lightning fit of a tiny MLP on the CPU, accumulation 2."""
import csv
import glob
import os

import pytest
import torch

try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning",
                             reason="neither lightning nor pytorch_lightning is installed")

from memprof.integrations import lightning as integration  # noqa: E402
from integration_checks import check_profile, retained, saved_profile  # noqa: E402

PEAK = "memprof/peak_bytes"
Callback = (integration.MemprofCallback if pl.__name__.startswith("lightning")
            else getattr(integration, "PLMemprofCallback", integration.MemprofCallback))


class TinyMLP(pl.LightningModule):
    def __init__(self, leak=False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 4))
        self.leak, self.kept = leak, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        if self.leak:
            self.kept.append(loss)        # the planted leak: the loss with its graph
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit(tmp_path, module, cb):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu",
                         devices=1, logger=pl.loggers.CSVLogger(str(tmp_path / "logs")),
                         log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return trainer


def test_fit_is_profiled_saved_and_logged(tmp_path):
    torch.manual_seed(0)
    module = TinyMLP()
    cb = Callback(tmp_path / "prof")
    trainer = fit(tmp_path, module, cb)
    prof = saved_profile(str(tmp_path / "prof"))
    check_profile(prof, module)           # 3 updates of 2 micro-batches each
    assert not [f for f in prof.findings if f.kind == "retained_graph"]
    losses = prof.run.records["logs"]
    assert [(s, n) for s, n, _ in losses] == [(0, "loss"), (1, "loss"), (2, "loss")]
    assert all(1.0 < v < 2.0 for *_, v in losses)   # ~ln 4: the mean, not half of it
    # the peak reached the Trainer's logger, one row per step
    assert trainer.logged_metrics[PEAK] > 0
    (metrics,) = glob.glob(os.path.join(tmp_path, "logs", "**", "metrics.csv"), recursive=True)
    rows = [r for r in csv.DictReader(open(metrics)) if r.get(PEAK)]
    assert len(rows) == 3 and all(float(r[PEAK]) > 0 for r in rows)


def test_kept_losses_are_a_retained_graph(tmp_path):
    fit(tmp_path, TinyMLP(leak=True), Callback(tmp_path / "prof"))
    retained(saved_profile(str(tmp_path / "prof")), "kept")


class ClearedEachEpoch(TinyMLP):
    """The outputs kept for the epoch's end, not detached, cleared there: the graphs are gone
    by the end of the fit, and the leak probe named them while it ran."""

    def on_train_epoch_end(self):
        self.kept.clear()


def test_a_leak_cleared_at_the_epochs_end_is_named_from_the_model(tmp_path):
    """Named as the model's attribute (`model.kept`), not by the path a Lightning frame had
    to it (`optimizer_step.<locals>.model.kept`)."""
    fit(tmp_path, ClearedEachEpoch(leak=True), Callback(tmp_path / "prof"))
    found = retained(saved_profile(str(tmp_path / "prof")), "kept")
    assert {f.holder for f in found} == {"model.kept"}, [f.holder for f in found]


class Boom(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            raise RuntimeError("boom")


def test_a_fit_that_raises_is_saved(tmp_path):
    cb = Callback(tmp_path / "prof")
    with pytest.raises(RuntimeError, match="boom"):
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
        pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[cb, Boom()]).fit(
            TinyMLP(), torch.utils.data.DataLoader(data, batch_size=8))
    prof = saved_profile(str(tmp_path / "prof"))
    assert "boom" in prof.meta["error"]
    assert len(prof.marker_positions("step")) == 2


def _phases_of(prof, op: str) -> set:
    from memprof.record.events import PHASES
    m = prof.memory
    ops = [prof.strings[int(i)] if i >= 0 else "" for i in m["op"]]
    return {PHASES[int(ph)] for o, ph, size in zip(ops, m["phase"], m["size"])
            if o == op and size > 0}


def test_training_step_is_the_forward_and_the_update_the_optimizer(tmp_path, recwarn):
    """Lightning calls training_step (which calls self.net, never the module's forward) and
    runs it in a closure inside optimizer.step(): the forward took 0 ms, the optimizer's own
    ops were in phase "other", 0 micro-steps per step and no batch size were reported."""
    from memprof.analyse import summary
    cb, module = Callback(tmp_path / "prof"), TinyMLP()
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    pl.Trainer(max_steps=4, accumulate_grad_batches=2, accelerator="cpu", devices=1,
               logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(
        module, torch.utils.data.DataLoader(data, batch_size=8))
    prof = saved_profile(str(tmp_path / "prof"))
    tp = summary(prof)["throughput"]
    assert tp["micro_steps_per_step"] == 2 and tp["batch_size"] == 8
    assert tp["stats"]["forward_ms"]["median"] > 0 and tp["stats"]["optimizer_ms"]["median"] > 0
    # AdamW's state and update temporaries, made inside optimizer.step(closure)
    assert _phases_of(prof, "aten::zeros_like") == {"optimizer"}
    assert _phases_of(prof, "aten::linear") == {"forward"}
    assert summary(prof)["activations_by_module"].get("net.1", 0) > 0
    # no logger: the peak is not logged (Lightning warned "no logger configured")
    assert not [w for w in recwarn if "no logger" in str(w.message)]
    # the instance's training_step is the class's again
    assert "training_step" not in module.__dict__
    # training_step(batch, batch_idx) is not a call of the module: not its recorded inputs
    # (a budget re-estimate would call pl_module((x, y), 0))
    assert prof.run.records.get("inputs") is None


def test_inside_memprof_run_forward_passes_are_marked_once(tmp_path):
    """A fit under `memprof run` (the callback's block nested in the script's): training_step
    was started as a pass through the inner block's scope, never installed - a second
    forward_start per step, with step 0, and the step's allocations in a wrong module."""
    import memprof
    cb = Callback(tmp_path / "prof")
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 16), torch.randint(0, 4, (32,)))
    with memprof.track(auto_modules=True) as outer:
        pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[cb]).fit(
            TinyMLP(), torch.utils.data.DataLoader(data, batch_size=8))
    for prof in (outer, saved_profile(str(tmp_path / "prof"))):
        starts = [m["value"] for m in prof.markers("forward_start")]
        assert len(starts) == 3 and starts == sorted(starts), starts


class SavesItself(TinyMLP):
    """Saves the whole module mid-fit (a user's own checkpoint of the LightningModule)."""

    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            import io
            buf = io.BytesIO()
            torch.save(self, buf)
            buf.seek(0)
            self.saved = torch.load(buf, weights_only=False)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("nested", [False, True], ids=["alone", "inside memprof run"])
def test_the_module_can_save_itself_inside_training_step(tmp_path, nested):
    """The integration's training_step is an instance attribute while it tracks: a save of
    the module in a step pickled it and failed (also inside an outer auto-mode block, as
    under `memprof run`)."""
    import contextlib
    import memprof
    module = SavesItself()
    with (memprof.track(auto_modules=True) if nested else contextlib.nullcontext()):
        fit(tmp_path, module, Callback(tmp_path / "prof"))
    copy = module.saved
    assert "training_step" not in vars(copy) and "training_step" not in vars(module)
    x = torch.randn(2, 16)
    assert copy.net(x).shape == (2, 4)
    assert saved_profile(str(tmp_path / "prof")).peak > 0


DDP_SPAWN_SCRIPT = '''
import torch
import {pl} as pl


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                        torch.nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(Net(), torch.utils.data.DataLoader(data,
                                                                                 batch_size=8))
'''


@pytest.mark.slow
def test_memprof_run_on_a_ddp_spawn_fit_records_each_rank(tmp_path):
    """Lightning's ddp_spawn starts its ranks with torch.multiprocessing.start_processes:
    under `memprof run` the fit's report had 0 events (the parent only waits)."""
    import subprocess
    import sys
    import memprof
    (tmp_path / "fit.py").write_text(DDP_SPAWN_SCRIPT.format(pl=pl.__name__))
    proc = subprocess.run([sys.executable, "-m", "memprof.cli", "run", "-o", "fit.memprof",
                           "fit.py"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        prof = memprof.load(str(tmp_path / f"fit.rank{rank}.memprof"))
        assert (prof.meta["rank"], prof.meta["world_size"]) == (rank, 2)
        assert len(prof.steps) == 4                      # 64 samples / 8 / 2 ranks
        assert prof.activations_by_module()["module.body.1"] > 0

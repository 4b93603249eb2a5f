"""memprof for `lightning.Trainer` (or `pytorch_lightning.Trainer`):

    from memprof.integrations.lightning import MemprofCallback
    trainer = lightning.Trainer(max_steps=..., callbacks=[MemprofCallback("profiles")])
    trainer.fit(module, loader)   # -> profiles/fit.memprof (fit.rank<R>.memprof when distributed)

Recording starts at `on_train_start` (model: the LightningModule; optimizer: the Trainer's
only optimizer, or every optimizer's steps when there are several) and stops at
`on_train_end`, or at `on_exception` with the error in the profile's meta. Steps are the
optimizer's steps (gradient accumulation: one per update). With automatic optimisation,
`training_step` is the forward pass (phase, batch size, micro-steps: it calls submodules, not
the module's own forward), and the optimizer's phase begins when Lightning's closure (forward
and backward, run inside `optimizer.step`) returns. The loss of each micro-batch
(`on_before_backward`, already divided by the accumulation) is summed into the step's loss and
logged at `on_before_optimizer_step`; every `log_every_n_steps`, `memprof/peak_bytes` (the
peak of live bytes since the previous one) goes to `pl_module.log`, i.e. the Trainer's logger
(not logged when the Trainer has none).

With both `lightning` and `pytorch_lightning` installed, `MemprofCallback` is for `lightning`
and `PLMemprofCallback` for `pytorch_lightning`.
"""
from __future__ import annotations

import importlib

from ._common import PEAK_KEY, RunAccess, RunTracker


def _frameworks() -> list:
    found = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            pass
    if not found:
        raise ImportError("memprof.integrations.lightning needs lightning: pip install lightning")
    return found


def _make(pl):
    class MemprofCallback(RunAccess, pl.Callback):
        """output_dir: where `<name>.memprof` is written; track_kwargs go to memprof.track()
        (health=True, budget="a100-40gb", capacity=..., analyses=...)."""

        def __init__(self, output_dir: str, name: str = "fit", log_peak: bool = True,
                     **track_kwargs):
            self.run = RunTracker(output_dir, name, track_kwargs)
            self.log_peak = log_peak
            self._loss = 0.0
            self._logged_step = -1

        def on_train_start(self, trainer, pl_module):
            opts = [o for o in trainer.optimizers]
            self._loss, self._logged_step = 0.0, trainer.global_step - 1
            self.run.start(pl_module, opts[0] if len(opts) == 1 else None,
                           {"model": pl_module, "trainer": trainer},
                           first_step=trainer.global_step)
            if getattr(pl_module, "automatic_optimization", True):
                # the forward is training_step (it calls submodules, rarely self(x)); under
                # manual optimisation it also runs backward and the optimizer, so it is not
                self.run.forward_method(pl_module, "training_step")

        def on_before_backward(self, trainer, pl_module, loss):
            if self.run.active and loss.numel() == 1:
                self._loss += float(loss.detach())

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.run.active:
                # the step this optimizer.step() ends (global_step counts finished ones)
                self.run.log_step(trainer.global_step, loss=self._loss)
                self._loss = 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if not (self.run.active and self.log_peak and trainer.loggers) \
                    or step == self._logged_step:
                return
            every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
            if step % every == 0 or self._logged_step < 0:
                peak = self.run.step_peak()
                if peak is not None:
                    pl_module.log(PEAK_KEY, float(peak), on_step=True, on_epoch=False,
                                  prog_bar=False, logger=True, batch_size=1)
                self._logged_step = step

        def on_train_end(self, trainer, pl_module):
            self.run.stop()

        def on_exception(self, trainer, pl_module, exception):
            self.run.stop(exception)

    return MemprofCallback


_found = _frameworks()
MemprofCallback = _make(_found[0])
if len(_found) > 1:
    PLMemprofCallback = _make(_found[1])

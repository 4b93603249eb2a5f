"""memprof for `transformers.Trainer`:

    from memprof.integrations.huggingface import MemprofCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[MemprofCallback("profiles")])
    trainer.train()          # -> profiles/train.memprof (train.rank<R>.memprof when distributed)

Recording starts at `on_train_begin` (the Trainer passes its model and optimizer) and stops at
`on_train_end`: analysis, findings and the saved profile as with `memprof.track()`. Steps are
the optimizer's steps (memprof's optimizer hooks see the torch optimizer inside accelerate's
wrapper), so gradient accumulation gives one step per update. At each `on_log` the logged
loss is given to the profile (for the step that just ended) and `logs["memprof/peak_bytes"]`
gets the peak of live bytes since the previous log (per step with `logging_steps=1`), so it
reaches the Trainer's console, `log_history` and report_to integrations (the callback moves
itself to the front of the Trainer's callback list when training begins, since report_to
callbacks come before the user's).

When training raises, the Trainer calls no callback (`on_train_end` is skipped). The profile
is then finished, with the error in its meta, by whichever comes first: the callback used as a
context manager (`with MemprofCallback(d) as cb: ...trainer.train()`), `cb.close()`, the next
`trainer.train()`, or the interpreter's exit. Until then memprof keeps recording.
"""
from __future__ import annotations

import sys

from ._common import PEAK_KEY, RunAccess, RunTracker, require

transformers = require("transformers", "transformers", "huggingface")
TrainerCallback = transformers.TrainerCallback


class MemprofCallback(RunAccess, TrainerCallback):
    """output_dir: where `<name>.memprof` is written; track_kwargs go to memprof.track()
    (health=True, budget="a100-40gb", capacity=..., analyses=...)."""

    def __init__(self, output_dir: str, name: str = "train", log_peak: bool = True,
                 **track_kwargs):
        self.run = RunTracker(output_dir, name, track_kwargs)
        self.log_peak = log_peak

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _run_first(self, sys._getframe(1))
        self.run.start(model, optimizer, {"model": model, "optimizer": optimizer,
                                          "lr_scheduler": kwargs.get("lr_scheduler")},
                       first_step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.run.active or logs is None:
            return
        if "loss" in logs:   # the mean loss of the steps since the last log; they just ended
            self.run.log_step(state.global_step - 1, loss=logs["loss"])
        if self.log_peak and "loss" in logs:   # training logs only, not eval or the summary
            peak = logs[PEAK_KEY] = self.run.step_peak()
            # Trainer.log appended a copy of `logs` to log_history before calling on_log
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and "loss" in last:
                last[PEAK_KEY] = peak

    def on_train_end(self, args, state, control, **kwargs):
        self.run.stop()

    # ------------------------------------------------------------------ when training raised
    def close(self, exc: BaseException | None = None) -> None:
        """Finish and save a run that did not reach on_train_end (a no-op otherwise)."""
        self.run.stop(exc if exc is not None else
                      (RuntimeError("training ended without on_train_end")
                       if self.run.active else None))

    def __enter__(self) -> "MemprofCallback":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(exc)
        return False


def _run_first(callback, caller) -> None:
    """Move the callback to the front of the Trainer's CallbackHandler (the frame calling
    on_train_begin), so that report_to integrations - listed before the user's callbacks -
    see the peak it adds to `logs`. Moving the current item to the front of the list being
    iterated leaves the items after it where they were: none is skipped or called twice."""
    handler = caller.f_locals.get("self") if caller is not None else None
    cbs = getattr(handler, "callbacks", None)
    if not isinstance(handler, transformers.trainer_callback.CallbackHandler) \
            or not isinstance(cbs, list) or callback not in cbs:
        return
    cbs.remove(callback)
    cbs.insert(0, callback)

"""Framework callbacks: memprof.track() for training loops that are not the user's.

    from memprof.integrations.huggingface import MemprofCallback   # transformers.Trainer
    from memprof.integrations.lightning import MemprofCallback     # lightning / pytorch_lightning

Each callback opens a `memprof.track(model, optimizer)` block when training begins and closes
it (analysis, findings, `<output_dir>/<name>.memprof`; `<name>.rank<R>.memprof` in a torchrun /
torch.distributed job, as memprof.track() names it) when training ends or raises; steps come
from memprof's optimizer hooks, the framework's loss is logged with `log`, and the framework's
own logging gets `memprof/peak_bytes` (the peak of live bytes since the last logged step).

The frameworks are optional: `import memprof` never imports them, and importing a submodule
here without its framework raises a one-line ImportError naming the package to install.
"""

"""Every estimate of a plan failing for one reason is said as that one failure (the model's
own error, where it raised, a hint): the check compared the errors' text, so a model whose
error names the batch size ('batch 1235 too big', 'batch 1133 too big': each policy fails
at its own boundary) kept a row 'estimate failed' per policy and 'No combination could be
estimated', with no word of the model's own code."""
import textwrap

from memprof import cli

MODULE = textwrap.dedent("""
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1024, 1024)

        def forward(self, x):
            return x + torch.relu(self.lin(x))

    class Net(nn.Module):
        '''Runs two samples at a time (the estimates at 2 and 4 differ in their ops, so each
        policy's boundary is estimated) and takes at most 4 a step.'''
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(32, 64 * 1024)
            self.blocks = nn.ModuleList([Block() for _ in range(4)])
            self.head = nn.Linear(1024, 4)

        def forward(self, x):
            if x.shape[0] > 4:
                raise ValueError(f"batch {x.shape[0]} too big")
            outs = []
            for chunk in x.split(2):
                h = self.stem(chunk).view(-1, 64, 1024)
                for b in self.blocks:
                    h = b(h)
                outs.append(self.head(h.mean(1)))
            return torch.cat(outs)

    def batch(batch_size=8):
        return torch.randn(batch_size, 32), torch.randint(0, 4, (batch_size,))
""")


def test_failures_whose_text_names_the_batch_size_are_one_failure(user_module, capsys):
    user_module("chunked_model", MODULE)
    rc = cli.main(["recommend", "--gpu", "t4", "--model", "chunked_model:Net", "--batch-fn",
                   "chunked_model:batch", "--checkpointing", "every,every-2", "--precision",
                   "fp32", "--effective-batch", "100000", "--workers", "1"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", out
    first, hint = err.strip().splitlines()
    assert first.startswith("memprof recommend: model Net(): its training step raises "
                            "ValueError: batch "), err
    line = next(i for i, text in enumerate(MODULE.splitlines(), 1) if "raise" in text)
    assert first.endswith(f" too big (the model's own code, at chunked_model.py:{line}; not "
                          "a fake-tensor problem)"), err
    assert hint.startswith("hint: one plain step shows it without memprof: x, y = batch(2)")


LIMITED = textwrap.dedent("""
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        '''Takes at most 4 samples a step: the fit estimates (2 and 4) run, the micro-batch
        they predict for a huge effective batch does not.'''
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 4))

        def forward(self, x):
            if x.shape[0] > 4:
                raise ValueError(f"batch {x.shape[0]} too big")
            return self.body(x)

    def batch(batch_size=8):
        return torch.randn(batch_size, 32), torch.randint(0, 4, (batch_size,))
""")


def test_a_model_that_raises_at_the_micro_batch_being_confirmed_is_said_in_one_line(
        user_module, capsys):
    """The last estimate, which confirms the best option's micro-batch, raised the model's
    own error with no word around it ('memprof recommend: batch 100000 too big': no table,
    no place, no hint); it is now the failure of that combination, and every combination
    failing so is the model's own error, said as any failed plan says it."""
    user_module("limited_model", LIMITED)
    rc = cli.main(["recommend", "--gpu", "t4", "--model", "limited_model:Net", "--batch-fn",
                   "limited_model:batch", "--checkpointing", "none", "--precision",
                   "fp32,fp16", "--effective-batch", "1000000", "--workers", "1"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (out, err)
    first = err.strip().splitlines()[0]
    assert first.startswith("memprof recommend: model Net(): its training step raises "
                            "ValueError: batch "), err
    line = next(i for i, text in enumerate(LIMITED.splitlines(), 1) if "raise" in text)
    assert f"(the model's own code, at limited_model.py:{line}" in first, err

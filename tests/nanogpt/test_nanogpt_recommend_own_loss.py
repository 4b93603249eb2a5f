"""`memprof recommend` of a nanoGPT-style model, whose forward returns (logits, loss) from the
targets in its batch: the plan estimated and printed `out.float().mean()  # stand-in: the batch
has no targets` - the logits' mean, not the model's own loss it was given the targets for."""
import subprocess
import sys
from pathlib import Path

import torch

import nanogpt_train
from memprof.plan.default_loss import default_loss, loss_rule

SCRIPT = Path(nanogpt_train.__file__)


def test_a_loss_returned_beside_the_logits_is_the_models_own():
    model = nanogpt_train.GPT()
    b = nanogpt_train.batch(4)
    out = model(**b)
    assert loss_rule(out, None) == {"rule": "own", "output": "[1]"}
    assert torch.equal(default_loss(out, None), out[1])
    # (loss, logits), a dict with a "loss" key: the same
    assert loss_rule((out[1], out[0]), None) == {"rule": "own", "output": "[0]"}
    assert loss_rule({"logits": out[0], "loss": out[1]}, None) == {"rule": "own",
                                                                  "output": "['loss']"}
    # no targets: nanoGPT returns (logits, None); a stand-in loss of the logits still
    assert loss_rule(model(b["idx"]), None)["rule"] == "mean"


class _VAE(torch.nn.Module):
    """Returns (reconstruction, kl): the kl is a scalar of the encoder's branch only."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(64, 16)
        self.dec = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.ReLU(),
                                       torch.nn.Linear(512, 64))

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1).mean()
        return self.dec(z), kl


def test_a_scalar_of_one_branch_is_not_the_models_loss():
    """Taken as the loss, a VAE's kl left the decoder without gradients or optimizer state in
    the estimate (about 5x too low); the stand-in of the first output reaches all of it."""
    torch.manual_seed(0)
    out = _VAE()(torch.randn(4, 64))
    assert loss_rule(out, None) == {"rule": "mean", "output": "[0]"}
    # (a scalar computed from the first output stays the model's own)
    logits = out[0]
    assert loss_rule((logits, logits.square().mean()), None)["rule"] == "own"


def test_recommend_prints_the_models_own_loss(tmp_path):
    r = subprocess.run([sys.executable, "-m", "memprof.cli", "recommend", "--gpu", "v100-16gb",
                        "--model", f"{SCRIPT}:GPT", "--batch-fn", f"{SCRIPT}:batch",
                        "--effective-batch", "8", "--checkpointing", "none"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no targets" not in r.stdout, r.stdout
    assert "loss = model(**x)[1]  # the model's own loss" in r.stdout, r.stdout
    code = r.stdout[r.stdout.index("import torch\n"):]
    ran = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr

"""The small MLP several tests share (a plain module: importable from any test folder)."""
import torch


class MLP(torch.nn.Module):
    """Linear(D,H) -> ReLU -> Linear(H,C): activation sizes are easy to compute by hand."""

    def __init__(self, d=64, h=128, c=10):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, h)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(h, c)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LoRALinear(torch.nn.Module):
    """A frozen Linear(d, d) plus a trainable rank-r update, as LoRA adds one (its a starts
    small and b at zero)."""

    def __init__(self, d, r=4):
        super().__init__()
        self.base = torch.nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(d, r) * 0.01)
        self.b = torch.nn.Parameter(torch.zeros(r, d))

    def forward(self, x):
        return self.base(x) + (x @ self.a) @ self.b

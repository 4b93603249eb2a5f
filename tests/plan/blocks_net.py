"""The small MLP of the N-GPU plan tests: four Linear+GELU blocks (the FSDP units the plans
name) and a 10-class head, with its batch function."""
import torch
import torch.nn as nn


class Blocks(nn.Module):
    def __init__(self, d=128, n=4):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.GELU())
                                     for _ in range(n)])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def blocks_batch(b):
    return (torch.randn(b, 128),), torch.randint(0, 10, (b,))

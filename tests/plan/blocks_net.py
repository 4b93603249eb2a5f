"""The small MLP of the N-GPU plan tests: fsdp_fake_pg's Net with four 128-wide blocks (the
FSDP units the plans name) and a 10-class head, with its batch function."""
import torch

from fsdp_fake_pg import Net


class Blocks(Net):
    def __init__(self, d=128, n=4):
        super().__init__(d=d, blocks=n, classes=10)


def blocks_batch(b):
    return (torch.randn(b, 128),), torch.randint(0, 10, (b,))

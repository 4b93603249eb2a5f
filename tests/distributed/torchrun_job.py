"""A 2-process gloo job of one of this folder's scripts, as the tests start it."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_job(script: str, out, world: int = 2) -> None:
    """torchrun --standalone the script (its argument: the output folder, also its cwd)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(world), os.path.join(HERE, script), str(out)],
        capture_output=True, text=True, timeout=240, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]

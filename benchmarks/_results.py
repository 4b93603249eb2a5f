"""What every benchmark records with its table: the machine, the command, and the files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra) -> dict:
    """Platform, CPU, cores, versions, load and commit; `extra` adds or overrides entries."""
    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True,
                                            check=True).stdout.strip()
    except Exception:  # noqa: BLE001  (not a checkout)
        info["git_commit"] = "unknown"
    info.update(extra)
    return info


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def save(out: str, text: str, payload: dict) -> None:
    """Write `out`.txt (the printed table) and `out`.json (the rows and their context)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".txt", "w") as f:
        f.write(text + "\n")
    with open(out + ".json", "w") as f:
        json.dump(payload, f, indent=1, default=str)

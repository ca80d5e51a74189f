"""Where a result came from: the code version and the hardware, for config files and captions.

Layer 1 (foundations): the trainer, the probe and the figures all record these,
so they live below all of them.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def code_version() -> dict:
    """``{"gradflow": version, "git_commit": sha, "git_dirty": bool}``; the git keys only inside a checkout.

    ``git_dirty`` is True when tracked files differ from the commit: the commit
    alone does not then name the code that ran.
    """
    from gradflow import __version__
    info: dict = {"gradflow": __version__}
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            info["git_commit"] = out.stdout.strip()
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here,  # the package
                                   capture_output=True, timeout=5)
            info["git_dirty"] = dirty.returncode == 1
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def hardware() -> str:
    """The CPU's model name, its core count and torch's thread count, in words."""
    import torch
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"

"""The precision a run computes in: ``--amp auto`` resolved for this hardware, and kept on resume.

bf16 autocast where bf16 runs in hardware (a CUDA GPU from Ampere on, a CPU with
AVX512-BF16 or AMX), float32 elsewhere; config.json records the choice as
``precision``, so a resumed run computes as it began on any hardware.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from gradflow.training.config import TrainConfig


def native_bf16(dev: torch.device) -> bool:
    """Whether ``dev`` does bf16 matrix products in hardware: a CUDA GPU from Ampere on, or a CPU
    with AVX512-BF16 or AMX.

    There bf16 autocast is the faster way to train (1.49x a float32 step for a
    width-0.5 ResNet-164 on an AVX512-BF16 CPU, ``benchmarks/train_bench.py
    --modes eager_cl,bf16_cl``); elsewhere bf16 is emulated and slower.
    """
    if dev.type == "cuda":   # Ampere and later; on older GPUs bf16 is emulated
        with torch.cuda.device(dev):
            try:
                return torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:    # torch < 2.4 counts no emulation
                return torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    cpu = torch.cpu   # private probes (torch >= 2.1); a torch without them gets float32
    probes = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


BF16, FP32 = "bf16 autocast", "float32"   # config.json's "precision"


def choose_amp(cfg: TrainConfig, dev: torch.device, resumed: Optional[Path]) -> tuple[bool, str]:
    """Whether the run computes under bf16 autocast, and (for ``--amp auto``) why.

    A resumed run computes as it began, even on other hardware: its config.json
    says how (runs written before it did: ``auto`` then meant bf16 on CUDA only).
    """
    if cfg.amp != "auto":
        return cfg.amp == "bf16", ""
    saved: dict = {}
    if resumed is not None:
        try:
            saved = json.loads((resumed / "config.json").read_text())
        except (OSError, ValueError):
            pass
    if saved.get("precision") in (BF16, FP32):
        return saved["precision"] == BF16, "kept from the run's start, as a resumed run computes as it began"
    if "device" in saved:
        return str(saved["device"]).startswith("cuda"), ("kept from the run's start, when --amp auto meant "
                                                         "bf16 on CUDA only")
    if native_bf16(dev):
        return True, f"{dev.type} with bf16 arithmetic in hardware; --amp none for float32"
    return False, f"{dev.type} without bf16 arithmetic in hardware; --amp bf16 forces it"

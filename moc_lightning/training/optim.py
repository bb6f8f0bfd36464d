"""AdamW with the paper's schedule: linear warm-up over the first 10% of steps, then cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Table 19 of the paper (GaLore's settings); sizes it does not list use the nearest one's rate.
PAPER_LEARNING_RATES = {
    "llama-tiny": 3e-3,
    "llama-small": 3e-3,
    "llama-60m": 2.5e-3,
    "llama-130m": 2.5e-3,
    "llama-350m": 1e-3,
    "llama-1b": 6e-4,
    "llama-7b": 6e-4,
}
DEFAULT_LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class OptimConfig:
    """lr None means Table 19's rate for the model's preset."""

    lr: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr, as in GaLore
    grad_clip: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        checks = {
            "lr": (self.lr is None or self.lr > 0, "expected a positive number or null (Table 19's rate)"),
            "betas": (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "expected two numbers in [0, 1)"),
            "weight_decay": (self.weight_decay >= 0, "expected >= 0"),
            "warmup_fraction": (0 <= self.warmup_fraction < 1, "expected 0 <= warmup_fraction < 1"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "expected 0 <= min_lr_ratio <= 1"),
            "grad_clip": (self.grad_clip >= 0, "expected >= 0 (0 turns clipping off)"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"optim.{name} = {getattr(self, name)!r} is not allowed: {allowed}")

    def learning_rate(self, preset: str) -> float:
        return self.lr if self.lr is not None else PAPER_LEARNING_RATES.get(preset, DEFAULT_LEARNING_RATE)


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> float:
    """The multiplier of the base learning rate at `step` (0-based)."""
    warmup = max(1, int(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params, cfg: OptimConfig, lr: float, total_steps: int):
    optimizer = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, cfg.warmup_fraction, cfg.min_lr_ratio)
    )
    return optimizer, schedule

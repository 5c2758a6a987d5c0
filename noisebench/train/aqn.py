"""AQN (adaptive quantization noise, QeRL): Gaussian noise on RMSNorm weights of the rollout model only.

QeRL (NVlabs/QeRL, ``trl_trainer/noise_scheduler.py``) adds noise in place to the weight of every RMSNorm of the
ROLLOUT model, redrawn after each weight sync, with a stepwise-decaying sigma: training steps split into
``num_stages`` equal intervals; interval 0 has sigma 0; interval k uses
``sigma_start * (sigma_end / sigma_start) ** ((k - 1) / (num_stages - 2))``.
On TRL's transformers path the rollout model IS the training model, so noise is added for the duration of
generation and the exact original weights are copied back afterwards (training never sees it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


def is_rms_norm(module: nn.Module) -> bool:
    """HF's hand-written RMSNorms (Qwen2RMSNorm, LlamaRMSNorm, ...) and torch's nn.RMSNorm."""
    return isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")


@dataclass
class AQNConfig:
    enabled: bool = False
    sigma_start: float = 1e-2
    sigma_end: float = 1e-4
    num_stages: int = 10
    seed: int = 4321

    def __post_init__(self):
        if self.enabled:
            if self.num_stages < 3:
                raise ValueError(f"aqn.num_stages must be >= 3 (got {self.num_stages})")
            if self.sigma_start <= 0 or self.sigma_end <= 0:
                raise ValueError(f"aqn.sigma_start and aqn.sigma_end must be > 0 (got {self.sigma_start}, "
                                 f"{self.sigma_end})")


class AQN:
    """Applies the QeRL schedule around rollouts. ``with aqn.rollout(model, step, max_steps): generate()``."""

    def __init__(self, cfg: AQNConfig):
        self.cfg = cfg
        self.last_sigma = 0.0
        self._gen: dict[torch.device, torch.Generator] = {}
        self._draws = 0

    def sigma(self, step: int, max_steps: int) -> float:
        """Sigma in force at training step ``step`` (0-based) of ``max_steps``."""
        c = self.cfg
        if not c.enabled:
            return 0.0
        interval = max(1, max_steps // c.num_stages)
        k = min(step // interval, c.num_stages - 1)
        if k == 0:
            return 0.0
        return c.sigma_start * (c.sigma_end / c.sigma_start) ** ((k - 1) / (c.num_stages - 2))

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._gen:
            self._gen[device] = torch.Generator(device=device)
        g = self._gen[device]
        g.manual_seed(self.cfg.seed * 1_000_003 + self._draws)
        return g

    @contextlib.contextmanager
    def rollout(self, model: nn.Module, step: int, max_steps: int):
        sigma = self.sigma(step, max_steps)
        self.last_sigma = sigma
        if sigma == 0.0:
            yield
            return
        saved = []
        with torch.no_grad():
            for module in model.modules():
                w = getattr(module, "weight", None)
                if is_rms_norm(module) and isinstance(w, torch.Tensor):
                    saved.append((w, w.detach().clone()))
                    noise = torch.randn(w.shape, generator=self._generator(w.device), device=w.device,
                                        dtype=torch.float32)
                    w.add_((sigma * noise).to(w.dtype))
                    self._draws += 1
        try:
            yield
        finally:
            with torch.no_grad():
                for w, orig in saved:
                    w.copy_(orig)

    def state_dict(self) -> dict:
        return {"draws": self._draws}

    def load_state_dict(self, state: dict) -> None:
        self._draws = int(state.get("draws", 0))

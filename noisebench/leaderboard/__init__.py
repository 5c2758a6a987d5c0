"""Leaderboards: result records -> pandas -> statistics -> markdown + plots (imports only noisebench.record)."""
from .build import build_leaderboards

__all__ = ["build_leaderboards"]

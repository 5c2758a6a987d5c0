"""Field helpers shared by the schemas: choice enums and range bounds that Hydra's types cannot express.

Choices are ``StrEnum``s so that OmegaConf rejects a bad one at composition, naming the valid values, while the
composed value still is a ``str`` (``==``, ``str()``, JSON and hashing all see the plain name).
Ranges ride in the dataclass field's metadata (``bounded``), next to the type, and are checked by
``noisebench.schema.rules`` right after composition.
"""
from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, Iterable, Optional

from omegaconf import MISSING

try:
    from enum import StrEnum
except ImportError:  # Python 3.10: the same behaviour, spelled out
    class StrEnum(str, Enum):
        __str__ = str.__str__
        __format__ = str.__format__


def choices(name: str, values: Iterable[str]) -> type[StrEnum]:
    """A StrEnum whose member names equal their values (so ``hash`` and ``==`` agree with the plain strings)."""
    return StrEnum(name, [(v, v) for v in values])


def bounded(default: Any = MISSING, *, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, factory=None) -> Any:
    """A dataclass field with a range: ``ge``/``gt`` lower bound, ``le`` upper bound (None values are not checked)."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def describe(meta: dict) -> str:
    """The range of a bounded field in words, e.g. ``>= 1`` or ``> 0 and <= 1``."""
    parts = [f">= {meta['ge']}" if "ge" in meta else None, f"> {meta['gt']}" if "gt" in meta else None,
             f"<= {meta['le']}" if "le" in meta else None]
    return " and ".join(p for p in parts if p)


def out_of_range(value: Any, meta: dict) -> bool:
    """True when ``value`` breaks the bounds in ``meta`` (a NaN breaks every bound)."""
    if value is None or not meta:
        return False
    v = float(value)
    if v != v:  # NaN
        return True
    return ("ge" in meta and v < meta["ge"]) or ("gt" in meta and v <= meta["gt"]) or ("le" in meta and v > meta["le"])

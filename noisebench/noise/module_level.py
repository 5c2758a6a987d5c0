"""ModuleNoiseInjector: the study's older module-level injector (forward hooks on chosen modules, forward only).

It reproduces ``HWErrorInjector`` of the original study for side-by-side comparison with the operator-level engine:
targets are matched like the study (``rmsnorm``, ``layernorm`` and ``linear`` by class, anything else as a
substring of the qualified module name), noise goes on the module's first input (``injection_point="input"``, the
study's default, like fake quantization) or on its output. It uses the same noise models, its own private random
stream (seed + rank, never the global RNG) and the same phase rules as ``NoiseInjector``, but has no backward noise.
Eager mode only (the hooks draw random numbers in Python).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional, Sequence

from torch import Tensor, nn

from .runtime import GLOBAL_PHASE, NoiseState
from .spec import PHASES, NoiseSpec

INJECTION_POINTS = ("input", "output")


def is_target(name: str, module: nn.Module, targets: Sequence[str]) -> bool:
    """The study's matching rule (``HWErrorInjector._is_target_module``)."""
    cls = type(module).__name__.lower()
    for t in (s.lower() for s in targets):
        if t == "rmsnorm" and "rmsnorm" in cls or t == "layernorm" and "layernorm" in cls:
            return True
        if t == "linear" and (isinstance(module, nn.Linear) or "linear" in cls):
            return True
        if t in name.lower():
            return True
    return False


class ModuleNoiseInjector:
    """Forward hooks that perturb chosen modules' inputs or outputs.

    Args:
        spec: a ``NoiseSpec`` or dict (``ops`` is ignored: ``targets`` chooses the modules).
        targets: study-style module patterns, default ``("rmsnorm",)``.
        injection_point: ``input`` (perturb the first positional input) or ``output``.
        global_phase: noise outside any phase context too (telemetry phase ``global``).
    """

    def __init__(self, spec: Any, targets: Sequence[str] = ("rmsnorm",), injection_point: str = "input",
                 global_phase: bool = False) -> None:
        self.spec = spec.validate() if isinstance(spec, NoiseSpec) else NoiseSpec.from_dict(spec)
        if injection_point not in INJECTION_POINTS:
            raise ValueError(f"injection_point {injection_point!r}; valid choices: {list(INJECTION_POINTS)}")
        self.targets = tuple(targets)
        self.injection_point = injection_point
        self.state = NoiseState()
        self.state.configure(self.spec, GLOBAL_PHASE if global_phase else None)
        self._handles: list = []

    def register_hooks(self, model: nn.Module) -> int:
        """Hook every target module of ``model``; returns how many were hooked."""
        count = 0
        for name, module in model.named_modules():
            if name and is_target(name, module, self.targets):
                label = "module:" + name
                if self.injection_point == "input":
                    self._handles.append(module.register_forward_pre_hook(self._pre(label)))
                else:
                    self._handles.append(module.register_forward_hook(self._post(label)))
                count += 1
        return count

    def remove_hooks(self) -> None:
        """Remove every hook: the model is as before."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on(self) -> bool:
        st = self.state
        ph = st.effective_phase()
        return ph != "train_backward" and st.phase_on(ph)

    def _noise(self, x, label: str):
        if isinstance(x, Tensor) and x.is_floating_point():
            return self.state.perturb(x, label, "fwd")
        return x

    def _pre(self, label: str):
        def hook(module, args):
            if not self._on() or not args:
                return None
            return (self._noise(args[0], label),) + tuple(args[1:])
        return hook

    def _post(self, label: str):
        def hook(module, args, out):
            if not self._on():
                return None
            return (self._noise(out[0], label),) + tuple(out[1:]) if isinstance(out, tuple) else self._noise(out, label)
        return hook

    @contextlib.contextmanager
    def phase(self, name: Optional[str]) -> Iterator["ModuleNoiseInjector"]:
        """Run the block in phase ``name``."""
        if name is not None and name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; valid choices: {list(PHASES)}")
        prev, self.state.phase = self.state.phase, name
        try:
            yield self
        finally:
            self.state.phase = prev

    def telemetry(self) -> Dict[str, float]:
        """Flat ``noise/<phase>/module:<name>/fwd/{calls,elements,rel_err_rms}``."""
        return self.state.telemetry()

    def state_dict(self) -> Dict[str, Any]:
        """Position of the noise stream."""
        return {"counters": dict(self.state.counters)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue the noise stream."""
        self.state.counters.update({k: int(v) for k, v in state["counters"].items()})

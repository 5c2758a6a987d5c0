"""NoiseInjector: the user-facing object that installs the engine, scopes phases and reports telemetry."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

from torch import nn

from . import norms
from .engine import default_intercept
from .intercept import INTERCEPTS, NoiseMode, Patches
from .runtime import GLOBAL_PHASE, STATE
from .spec import PHASES, NoiseSpec


class NoiseInjector:
    """Operator-level noise for any PyTorch model, scoped by phase.

    Example:
        >>> inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-3, phases=["all"]))
        >>> inj.attach(model)                      # hand-written RMSNorms + qualified module names
        >>> with inj:                              # install; torch is exactly as before on exit
        ...     with inj.phase("train_forward"): loss = model(**batch).loss
        ...     with inj.phase("train_backward"): loss.backward()
        >>> inj.telemetry()["noise/train_forward/linear/fwd/calls"]

    Args:
        spec: a ``NoiseSpec``, or a dict / OmegaConf node of its fields (validated).
        global_phase: outside any phase context, noise every covered call, forward and backward (as the study's
            env-installed engine did). Telemetry labels those calls ``global``.
        default_phase: alternatively, a phase name in force outside contexts (the vLLM plugin uses ``rollout``).
        hooks: where the module hooks (targeting, hand-written norms) go: ``global`` (default) on every module that
            runs, ``attached`` only on the attached models' modules whose class can matter. ``attached`` is exact
            only when every model run under the injector is attached; it spares every other module call torch's
            slow path and compiled frames the guards of global hooks.
        intercept: how covered calls are caught: ``mode`` (default; ``configure_engine(intercept=...)``), a
            TorchFunctionMode that sees every torch call of the installing thread, eager or compiled; or ``patch``,
            the covered spellings replaced while installed, so only covered calls run Python (eager code only:
            compiling under it raises; names bound before install are not seen). See ``intercept.INTERCEPTS``.

    Only one injector can be installed at a time. With type ``none`` installing is a no-op, so outputs and
    gradients are bitwise those of plain torch; outside enabled phases the mode does one dict lookup per call.
    """

    def __init__(self, spec: Any, global_phase: bool = False, default_phase: Optional[str] = None,
                 hooks: str = "global", intercept: Optional[str] = None) -> None:
        self.spec = spec.validate() if isinstance(spec, NoiseSpec) else NoiseSpec.from_dict(spec)
        if hooks not in norms.HOOKS:
            raise ValueError(f"hooks={hooks!r} unknown; valid choices: {list(norms.HOOKS)}")
        self.hooks = hooks
        if intercept is None:
            intercept = default_intercept()
        if intercept not in INTERCEPTS:
            raise ValueError(f"intercept={intercept!r} unknown; valid choices: {list(INTERCEPTS)}")
        self.intercept = intercept
        if default_phase is not None and default_phase not in PHASES:
            raise ValueError(f"default_phase {default_phase!r} is not a phase; valid choices: {list(PHASES)}")
        self.default_phase = GLOBAL_PHASE if global_phase else default_phase
        self._phase: Optional[str] = None
        self._mode = None   # the NoiseMode or the Patches in force
        self._hooks: list = []
        self._attached: Dict[int, tuple] = {}
        self._installed = False
        self._counters = {"fwd": 0, "bwd": 0}
        self._calls: dict = {}
        self._elements: dict = {}
        self._err_sums: dict = {}

    # -- install / uninstall -------------------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        """Whether this injector is the one in force."""
        return self._installed

    def install(self) -> "NoiseInjector":
        """Push the TorchFunctionMode (or the patches) and the module hooks (nothing at all for type ``none``)."""
        if self._installed:
            return self
        owner = getattr(STATE, "owner", None)
        if owner is not None and owner is not self:
            raise RuntimeError("another NoiseInjector is installed; uninstall it first")
        self._installed = True
        STATE.owner = self
        if not self.spec.enabled:
            return self
        STATE.configure(self.spec, self.default_phase)
        STATE.counters, STATE.calls, STATE.elements, STATE.err_sums = (
            self._counters, self._calls, self._elements, self._err_sums)
        STATE.phase = self._phase
        STATE.refresh()
        self._hooks = norms.install_hooks(self.spec, self._models(), self.hooks)
        self._mode = NoiseMode() if self.intercept == "mode" else Patches()
        self._mode.__enter__()
        return self

    def uninstall(self) -> None:
        """Pop the mode (or remove the patches) and the module hooks: torch behaves exactly as without noisebench."""
        if not self._installed:
            return
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._remove_hooks()
        STATE.configure(None, None)
        STATE.counters, STATE.calls, STATE.elements, STATE.err_sums = {"fwd": 0, "bwd": 0}, {}, {}, {}
        STATE.owner = None
        self._installed = False

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _rehook(self) -> None:
        """Hook the attached models afresh (``hooks="attached"``: the set of attached models changed)."""
        self._remove_hooks()
        self._hooks = norms.install_hooks(self.spec, self._models(), self.hooks)

    def __enter__(self) -> "NoiseInjector":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- phases --------------------------------------------------------------------------------------------------
    @property
    def current_phase(self) -> Optional[str]:
        """The phase context in force (None outside contexts)."""
        return self._phase

    def set_phase(self, name: Optional[str]) -> None:
        """Set the phase without a context (for frameworks with begin/end callbacks); None clears it."""
        if name is not None and name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; valid choices: {list(PHASES)}")
        self._phase = name
        if self._installed and self.spec.enabled:
            STATE.phase = name
            STATE.refresh()

    @contextlib.contextmanager
    def phase(self, name: Optional[str]) -> Iterator["NoiseInjector"]:
        """Run the block in phase ``name`` (one of ``PHASES``); the previous phase is restored on exit."""
        prev = self._phase
        self.set_phase(name)
        try:
            yield self
        finally:
            self.set_phase(prev)

    # -- models --------------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        """Register ``model``'s qualified module names (for include/exclude/layers) and hook the weight gradient of
        its hand-written RMSNorm modules. Without it, targeting uses class names only and norm weights get no
        backward noise. Call before ``torch.compile``. Returns the model."""
        self.detach(model)
        self._attached[id(model)] = (model, norms.annotate(model, self.spec))
        if self._installed and self.spec.enabled:
            if self.hooks == "attached":   # hook the new model's modules too
                self._rehook()
            else:
                norms.set_skip(norms.skip_classes(self.spec, self._models()))
        return model

    def is_attached(self, model: nn.Module) -> bool:
        """Whether ``model`` is attached."""
        return id(model) in self._attached

    def _models(self) -> list:
        """The attached models."""
        return [m for m, _ in self._attached.values()]

    def detach(self, model: nn.Module) -> None:
        """Undo ``attach``."""
        entry = self._attached.pop(id(model), None)
        if entry is not None:
            for h in entry[1]:
                h.remove()
            norms.clear(model)
            if self._installed and self.spec.enabled and self.hooks == "attached":
                self._rehook()

    # -- telemetry and resume ------------------------------------------------------------------------------------
    def telemetry(self) -> Dict[str, float]:
        """Flat dict ``noise/<phase>/<op>/<fwd|bwd>/{calls,elements,rel_err_rms}`` for loggers."""
        saved = (STATE.calls, STATE.elements, STATE.err_sums)
        STATE.calls, STATE.elements, STATE.err_sums = self._calls, self._elements, self._err_sums
        try:
            return STATE.telemetry()
        finally:
            STATE.calls, STATE.elements, STATE.err_sums = saved

    def reset_telemetry(self) -> None:
        """Zero the telemetry (the random stream continues)."""
        self._calls.clear()
        self._elements.clear()
        self._err_sums.clear()

    def state_dict(self) -> Dict[str, Any]:
        """Position of the noise stream (draw counters) and the spec, for a bitwise resume."""
        return {"counters": dict(self._counters), "spec": self.spec.to_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue the noise stream where ``state_dict()`` left it."""
        counters = state["counters"]
        self._counters["fwd"] = int(counters["fwd"])
        self._counters["bwd"] = int(counters["bwd"])

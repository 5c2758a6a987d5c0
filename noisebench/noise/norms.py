"""Module hooks: module-name targeting (include/exclude/layers) and hand-written RMSNorm modules (Qwen2RMSNorm).

Hand-written norms are pow/mean/rsqrt/mul, invisible to the TorchFunctionMode, so their output is noised by a
forward hook, their input gradient by marking the input in a forward pre-hook, and their weight gradient by a
``weight.register_hook``. Every hook is gated on the state: when noise is off it returns None, which keeps outputs
and gradients bitwise clean (an ungated hook at scale 0 still changes the gradient summation order). Module-name
targeting works the same way: entering an excluded (included) module raises a depth counter that the mode reads.
"""
from __future__ import annotations

import functools
import re
import weakref
from typing import List, Optional, Tuple

import torch
from torch import nn

from .intercept import backward_noise, mark, noise_output
from .runtime import STATE
from .spec import NoiseSpec

NEUTRAL, EXCLUDE, INCLUDE = 0, 1, 2
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)$")
_ATTR = "_noisebench_info"


def is_handwritten_rmsnorm(module: nn.Module) -> bool:
    """RMSNorm modules that do not call ``F.rms_norm`` (``torch.nn.RMSNorm`` does, and the mode already sees it)."""
    return "rmsnorm" in type(module).__name__.lower() and not isinstance(module, getattr(nn, "RMSNorm", ()))


def module_info(spec: NoiseSpec, name: Optional[str], module: nn.Module) -> Tuple[int, bool]:
    """(scope, is_norm) of a module: scope from exclude/include regexes on its qualified name (if known) and class
    name, and from the decoder-layer range; is_norm for hand-written RMSNorm modules."""
    names = [type(module).__name__] + ([name] if name else [])
    scope = NEUTRAL
    if any(re.search(p, n) for p in spec.exclude for n in names):
        scope = EXCLUDE
    elif name is not None and spec.layers is not None and _LAYER_RE.search(name):
        idx = int(_LAYER_RE.search(name).group(1))
        inside = spec.layers[0] <= idx <= spec.layers[1]
        scope = EXCLUDE if not inside else (NEUTRAL if spec.include else INCLUDE)
    elif any(re.search(p, n) for p in spec.include for n in names):
        scope = INCLUDE
    return scope, is_handwritten_rmsnorm(module)


_CLASS_INFO: dict = {}  # class -> info for modules not attached under the current spec (cleared on install)


def _info(module: nn.Module) -> Tuple[int, bool]:
    info = module.__dict__.get(_ATTR)
    if info is not None and info[0] is STATE.spec:
        return info[1]
    if torch.compiler.is_compiling():  # a cache filled while tracing makes Dynamo guard on its size: a recompile
        return module_info(STATE.spec, None, module)    # for every class met later
    cls = type(module)
    got = _CLASS_INFO.get(cls)
    if got is None:
        got = _CLASS_INFO[cls] = module_info(STATE.spec, None, module)
    return got


_SKIP: frozenset = frozenset()  # classes whose every known module is neutral and not a noised norm (see skip_classes)


def skip_classes(spec: NoiseSpec, models) -> frozenset:
    """Module classes the global hooks may ignore under ``spec``: every module of the class in the attached ``models``
    has a neutral scope and is not a norm whose noise is on, and so would any unattached module of the class (scope
    from its class name). Why: Dynamo traces the hooks of every module and guards on what they read; reading
    each module's annotation costs ~5 guards a module (1.5k for a 28-layer model, ~1 ms of guard checks per compiled
    decode step), while ``type(module) in _SKIP`` is decided from guards Dynamo already has."""
    norm_noise = "rms_norm" in spec.resolved_ops()
    seen, interesting = set(), set()
    for model in models:
        for name, module in model.named_modules():
            cls = type(module)
            info = module.__dict__.get(_ATTR)
            scope, norm = info[1] if info is not None and info[0] is spec else module_info(spec, name, module)
            if cls not in seen:
                seen.add(cls)
                c_scope, _ = module_info(spec, None, module)
                if c_scope != NEUTRAL:
                    interesting.add(cls)
            if scope != NEUTRAL or (norm and norm_noise):
                interesting.add(cls)
    return frozenset(c for c in seen if c not in interesting)


def set_skip(classes: frozenset) -> None:
    global _SKIP
    _SKIP = frozenset(classes)


def pre_hook(module: nn.Module, args):
    """Global forward pre-hook: enter the module's scope; mark a norm's input for backward noise."""
    if type(module) in _SKIP or STATE.spec is None:
        return None
    scope, norm = _info(module)
    if scope == EXCLUDE:
        STATE.excl_depth += 1
    elif scope == INCLUDE:
        STATE.incl_depth += 1
    if norm and args and "rms_norm" in STATE.bwd_ops and torch.is_grad_enabled() and not STATE.blocked():
        return (mark(args[0], "rms_norm"),) + tuple(args[1:])
    return None


def post_hook(module: nn.Module, args, output):
    """Global forward hook: noise a norm's output; leave the module's scope."""
    if type(module) in _SKIP or STATE.spec is None:
        return None
    scope, norm = _info(module)
    result = None
    if norm and "rms_norm" in STATE.fwd_ops and not STATE.blocked():
        if isinstance(output, tuple):  # e.g. vLLM's fused add+norm returns (out, residual)
            result = (noise_output(output[0], "rms_norm"),) + output[1:]
        else:
            result = noise_output(output, "rms_norm")
    if scope == EXCLUDE:
        STATE.excl_depth -= 1
    elif scope == INCLUDE:
        STATE.incl_depth -= 1
    return result


def _weight_grad_hook(spec: NoiseSpec, grad: torch.Tensor):
    if STATE.spec is spec and "rms_norm" in STATE.bwd_ops and STATE.bwd_live():
        return backward_noise(grad, "rms_norm")
    return None


def annotate(model: nn.Module, spec: NoiseSpec) -> List[torch.utils.hooks.RemovableHandle]:
    """Record each module's scope from its qualified name; hook the weight of every hand-written RMSNorm that is
    not excluded. Returns the weight-hook handles (for ``detach``)."""
    handles, scopes = [], {}
    need_incl = bool(spec.include or spec.layers is not None)
    for name, module in model.named_modules():
        info = module_info(spec, name, module)
        module.__dict__[_ATTR] = (spec, info)
        scopes[name] = info[0]
        weight = getattr(module, "weight", None)
        if not (info[1] and isinstance(weight, torch.Tensor) and weight.requires_grad):
            continue
        parts = name.split(".") if name else []
        chain = [scopes.get(".".join(parts[:i]), NEUTRAL) for i in range(len(parts) + 1)]
        if EXCLUDE not in chain and (INCLUDE in chain or not need_incl):
            handles.append(weight.register_hook(functools.partial(_weight_grad_hook, spec)))
    return handles


def clear(model: nn.Module) -> None:
    """Forget the annotations made by ``annotate`` (class-name defaults apply again)."""
    for module in model.modules():
        module.__dict__.pop(_ATTR, None)


_HOOK_IDS: dict = {}  # hook dict name -> the handle id used the first time (reused on every later install)
_MODULE_HOOK_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # module -> the same, per module
HOOKS = ("global", "attached")


def _register_stable(ids: dict, name: str, hooks: dict, hook, register) -> torch.utils.hooks.RemovableHandle:
    """Register ``hook`` in ``hooks`` under the id it had the first time (``ids[name]``), or afresh."""
    hid = ids.get(name)
    if hid is None or hid in hooks:
        h = register(hook)
        ids.setdefault(name, h.id)
        return h
    h = torch.utils.hooks.RemovableHandle(hooks)
    h.id = hid
    hooks[hid] = hook
    return h


def install_hooks(spec: Optional[NoiseSpec] = None, models=(), where: str = "global"
                  ) -> List[torch.utils.hooks.RemovableHandle]:
    """Register the module hooks while installed (``where`` is one of ``HOOKS``, checked by ``NoiseInjector``):
    ``global`` (default) on every module of every model, attached or not; ``attached``: only on the modules of the
    attached ``models`` whose class can matter (not in ``_SKIP``: for Qwen2 under the default spec, the rotary
    embedding alone). Why ``attached``: any global hook sends
    every module call through torch's slow path and Dynamo guards on it in every compiled frame; it is exact only
    when every model that runs under the injector is attached (unattached modules get no targeting at all).

    Each reinstall reuses the handle ids of the first install: Dynamo guards on the keys of the hook dicts, so fresh
    ids would recompile every compiled model at every install (a rollout that installs the injector per
    generation would recompile its decode step each time)."""
    _CLASS_INFO.clear()
    set_skip(skip_classes(spec, models) if spec is not None else frozenset())
    handles = []
    if where == "attached":
        for model in models:
            for module in model.modules():
                if type(module) in _SKIP:
                    continue
                ids = _MODULE_HOOK_IDS.setdefault(module, {})
                handles.append(_register_stable(ids, "pre", module._forward_pre_hooks, pre_hook,
                                                module.register_forward_pre_hook))
                handles.append(_register_stable(ids, "post", module._forward_hooks, post_hook,
                                                module.register_forward_hook))
        return handles
    mod = nn.modules.module
    for name, hook, register in (("_global_forward_pre_hooks", pre_hook, mod.register_module_forward_pre_hook),
                                 ("_global_forward_hooks", post_hook, mod.register_module_forward_hook)):
        handles.append(_register_stable(_HOOK_IDS, name, getattr(mod, name), hook, register))
    return handles

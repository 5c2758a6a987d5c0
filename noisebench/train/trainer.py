"""TRL's GRPOTrainer with noise phases bounded exactly, sampling log-probs kept, AQN and a resumable noise stream.

Where the phases sit in TRL 1.16 (shared/notes/trl-grpo.md):
- ``_generate_single_turn``                         -> ``rollout``   (model.generate; AQN applies here)
- ``_get_per_token_logps_and_entropies`` with no phase active -> ``reference`` (ref / old-policy log-probs)
- ``_compute_loss``                                 -> ``train_forward``
- ``accelerator.backward``                          -> ``train_backward``
No GRPO logic lives here: only phase boundaries, measurement and the glue of the ``mitigation`` group.

Importance sampling on the transformers path: TRL 1.16 computes its correction (old log-probs recomputed by the
trainer, ratio against ``sampling_per_token_logps``, truncated or masked per ``vllm_importance_sampling_mode``) and
applies it in ``_compute_loss``, but only ``if self.use_vllm and self.vllm_importance_sampling_correction``. Here the
sampler log-probs are the ones recorded during ``generate``, and ``use_vllm`` reads True only inside that code: from
the end of generation to the end of ``_generate_and_score_completions``, and inside ``_compute_loss`` (every other
``use_vllm`` read sits in generation or ``__init__``). TRL's own correction then runs unchanged, as on its vLLM path,
including its recomputed old log-probs (PPO's ratio then sees the recompute, as on TRL's vLLM path).
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections import defaultdict
from typing import Any

import torch
from transformers import LogitsProcessorList
from trl import GRPOTrainer

from noisebench.train.aqn import AQN
from noisebench.train import mitigation as mit
from noisebench.train.lm_head import fp32_log_probs, fp32_output_head, unfused_lm_head
from noisebench.train.mismatch import SampledLogprobRecorder, aggregate, mismatch_stats
from noisebench.train.rollout_corr import rollout_corr_metrics
from noisebench.train.vllm import check_rollout_noise

NOISE_STATE_FILE = "noisebench_noise_state.pt"


class NoisyGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that runs each phase under ``injector.phase(name)``.

    Args:
        injector: a ``noisebench.noise.NoiseInjector`` (installed by the caller), or None for no noise at all.
        aqn (AQN | None): QeRL's rollout-only RMSNorm-weight noise, or None.
        record_sampling_logps (bool): keep the rollout's log-probs to measure the rollout/training mismatch.
        unfused_lm_head (bool): compute training/reference log-probs through ``F.linear`` so the lm_head is noisy
            there too (see ``noisebench.train.lm_head``); False keeps TRL's fused head (clean lm_head in training).
        mitigation (dict | None): the ``mitigation`` group (importance sampling, fp32 lm_head); None: none. On the
            vLLM path TRL applies it from its GRPOConfig keys (``noisebench.train.mitigation.grpo_args``).
        Other arguments go to ``trl.GRPOTrainer``.
    """

    def __init__(self, *args, injector=None, aqn: AQN | None = None, record_sampling_logps: bool = True,
                 unfused_lm_head: bool = True, mitigation: dict | None = None, **kwargs):
        self.mitigation = mit.resolve(mitigation)
        self.injector = injector
        self.unfused_lm_head = unfused_lm_head
        self.aqn = aqn
        self.record_sampling_logps = record_sampling_logps
        self.nb_phase: str | None = None
        self.mismatch_history: list[dict[str, float]] = []
        self._step_mismatch: dict[str, list[float]] = defaultdict(list)
        super().__init__(*args, **kwargs)
        self._init_mitigation()
        if injector is not None:
            injector.attach(self.model)
            if getattr(self, "ref_model", None) is not None:
                injector.attach(self.ref_model)
        backward = self.accelerator.backward

        @functools.wraps(backward)
        def noisy_backward(loss, **kw):
            with self._phase("train_backward"):
                return backward(loss, **kw)

        self.accelerator.backward = noisy_backward

    # ---- mitigation (module docstring) --------------------------------------------------------------------------
    _use_vllm = False
    hf_importance_sampling = fp32_head = False
    _is_window = False   # True where TRL's vLLM-gated importance-sampling code should run on the transformers path

    @property
    def use_vllm(self) -> bool:
        return self._use_vllm or self._is_window

    @use_vllm.setter
    def use_vllm(self, value: bool) -> None:
        self._use_vllm = bool(value)

    def _init_mitigation(self) -> None:
        mode = mit.trl_mode(self.mitigation)
        self.hf_importance_sampling = mode is not None and not self._use_vllm
        self.fp32_head = bool(self.mitigation["fp32_lm_head"]) and not self._use_vllm  # vLLM path: TRL's cast
        if self.hf_importance_sampling:
            if not self.record_sampling_logps:
                raise ValueError("mitigation importance sampling needs the sampler log-probs: record_sampling_logps")
            # the mitigation alone decides TRL's correction (its GRPOConfig default is on, for vLLM)
            self.vllm_importance_sampling_correction = True
            self.vllm_importance_sampling_mode = mode
            self.vllm_importance_sampling_clip_max = self.mitigation["clip_max"]
            self.vllm_importance_sampling_clip_min = self.mitigation["clip_min"]

    def _generate(self, prompts):
        out = super()._generate(prompts)
        self._is_window = self.hf_importance_sampling and self.model.training
        return out

    def _generate_and_score_completions(self, inputs):
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._is_window = False

    # ---- phases -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _phase(self, name: str):
        prev, self.nb_phase = self.nb_phase, name
        head = unfused_lm_head(self.unfused_lm_head and name in ("train_forward", "reference"))
        fp32 = self.fp32_head and name in ("rollout", "reference", "train_forward")
        fp32_train = fp32_log_probs(fp32 and name != "rollout")  # wraps whichever head is in force: enter after it
        fp32_roll = (fp32_output_head(self.accelerator.unwrap_model(self.model)) if fp32 and name == "rollout"
                     else contextlib.nullcontext())
        try:
            with (self.injector.phase(name) if self.injector is not None else contextlib.nullcontext()):
                with head, fp32_train, fp32_roll:
                    yield
        finally:
            self.nb_phase = prev

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        run = functools.partial(super()._generate_single_turn, prompt_ids, images, multimodal_fields,
                                num_generations, has_tool_images)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        aqn_ctx = (self.aqn.rollout(model, self.state.global_step, self.state.max_steps or self.args.max_steps)
                   if self.aqn is not None else contextlib.nullcontext())
        with self._phase("rollout"), aqn_ctx:
            if self.use_vllm:  # vLLM returns its own sampling log-probs
                out = run()
                if not self._vllm_noise_checked:
                    self._vllm_noise_checked = True
                    check_rollout_noise(self.injector, self.args.vllm_mode)
                return out
            if not self.record_sampling_logps:
                return run()
            recorder = SampledLogprobRecorder(self.temperature)
            original = type(model).generate
            model.generate = functools.partial(original, model, logits_processor=LogitsProcessorList([recorder]))
            try:
                completion_ids, logprobs = run()
            finally:
                del model.generate
            return completion_ids, recorder.finish(completion_ids)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if self.nb_phase is None:
            with self._phase("reference"):
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self.nb_phase == "train_forward" and self._loss_inputs is not None:
            self._measure_mismatch(out[0])
        return out

    def _compute_loss(self, model, inputs):
        self._loss_inputs = inputs
        self._is_window = self.hf_importance_sampling and "importance_sampling_ratio" in inputs
        try:
            with self._phase("train_forward"):
                return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None
            self._is_window = False

    _loss_inputs: dict[str, Any] | None = None
    _vllm_noise_checked = False

    # ---- mismatch -----------------------------------------------------------------------------------------------
    def _measure_mismatch(self, train_logps: torch.Tensor) -> None:
        sampling = self._loss_inputs.get("sampling_per_token_logps")
        if sampling is None or sampling.shape != train_logps.shape:
            return
        mask = self._loss_inputs["completion_mask"]
        stats = mismatch_stats(sampling, train_logps, mask)
        stats.update(rollout_corr_metrics(sampling, train_logps, mask, **mit.metric_correction(self.mitigation)))
        for k, v in stats.items():
            self._step_mismatch[k].append(v)
            self._metrics["train"][k if k.startswith("rollout_corr/") else f"mismatch/{k}"].append(v)

    def pop_step_mismatch(self) -> dict[str, float]:
        """Mean (max for *_max, min for *_min) of this step's mismatch statistics; clears them."""
        out = {k: aggregate(k, vals) for k, vals in self._step_mismatch.items()}
        self._step_mismatch.clear()
        return out

    # ---- resumable noise stream -----------------------------------------------------------------------------------
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        state = {}
        if self.injector is not None:
            state["injector"] = self.injector.state_dict()
            state["telemetry"] = telemetry_state(self.injector)
        if self.aqn is not None:
            state["aqn"] = self.aqn.state_dict()
        torch.save(state, os.path.join(output_dir, NOISE_STATE_FILE))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, NOISE_STATE_FILE)
        if not os.path.exists(path):
            return
        state = torch.load(path, weights_only=False)
        if "injector" in state and self.injector is not None:
            self.injector.load_state_dict(state["injector"])
            load_telemetry_state(self.injector, state.get("telemetry"), self.args.device)
        if "aqn" in state and self.aqn is not None:
            self.aqn.load_state_dict(state["aqn"])


# The injector's telemetry counters are not part of its stream state (a resume must draw identically whether or not
# it counts), so they travel beside it: a resumed run reports the calls of the whole run, as a straight one does.
_TELEMETRY = ("_calls", "_elements", "_err_sums")


def telemetry_state(injector) -> dict | None:
    """Copy of the injector's telemetry counters (None for an injector without them)."""
    if not all(hasattr(injector, k) for k in _TELEMETRY):
        return None
    out = {k: dict(getattr(injector, k)) for k in _TELEMETRY}
    out["_err_sums"] = {key: t.detach().cpu().clone() for key, t in out["_err_sums"].items()}
    return out


def load_telemetry_state(injector, state: dict | None, device=None) -> None:
    """Put saved counters back in place: the same dict objects are updated, since an installed injector shares
    them with the noise runtime; error sums go to ``device`` (the runtime starts a new sum on any other)."""
    if not state or not all(hasattr(injector, k) for k in _TELEMETRY):
        return
    for k in _TELEMETRY:
        live = getattr(injector, k)
        live.clear()
        live.update(state[k])
    if device is not None:
        injector._err_sums.update({key: t.to(device) for key, t in injector._err_sums.items()})

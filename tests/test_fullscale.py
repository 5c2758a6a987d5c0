"""The study at full scale (issue 8): Qwen testbed config, dry run, vLLM plugin glue, per-rank noise, accelerate configs.

vLLM itself cannot be installed here: these tests check everything on this side of vLLM's plugin and TRL's
``LLM(...)`` call, with the real entry-point machinery (importlib.metadata on a built install) and real subprocesses.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_GSM8K, compose

QWEN = ["+exp=e4c", "testbed=qwen2_5_1_5b_gsm8k"]
ENV_BASE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _clean_env(**extra) -> dict:
    """This process's environment without any noise or distributed variables, plus ``extra``."""
    drop = ("NOISEBENCH_", "VERL_NOISY_OPS_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(ENV_BASE)
    env.update(extra)
    return env


def _cli(args: list[str], env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "noisebench.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# ---- configuration -------------------------------------------------------------------------------------------------
def test_qwen_testbed_composes_with_the_study_recipe():
    cfg = compose(QWEN)
    t = cfg.trainer
    assert cfg.testbed.name == "qwen2_5_1_5b_gsm8k" and cfg.testbed.model_id == "Qwen/Qwen2.5-1.5B-Instruct"
    assert "grpo" not in cfg.testbed  # the recipe lives in conf/trainer/grpo_qwen.yaml only
    assert (t.max_steps, t.prompts_per_step, t.num_generations) == (116, 64, 5)
    assert t.max_steps == 7473 // t.prompts_per_step  # one epoch of GSM8K train at 64 prompts a step
    assert (t.args.learning_rate, t.args.beta, t.args.epsilon, t.args.weight_decay) == (1e-6, 0.001, 0.2, 0.01)
    assert cfg.eval.eval_every == 20 and cfg.experiment == "e4c"
    assert t.vllm_enforce_eager is True and t.args.vllm_mode == "colocate"
    # the tiny default keeps its own trainer
    tiny = compose([])
    assert tiny.testbed.name == "tiny_sharpen" and tiny.trainer.args.learning_rate != t.args.learning_rate


def test_per_device_batch_splits_the_step_over_ranks_and_accumulation(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from noisebench.train.builders import grpo_config, per_device_batch

    cfg = compose(QWEN + ["trainer.args.bf16=false"])
    assert per_device_batch(cfg) == 64 * 5 // 4
    # TRL's own arithmetic: one generation batch (= one optimizer step here) holds prompts_per_step x generations
    args = grpo_config(cfg, SimpleNamespace(max_completion_length=16), tmp_path, "cpu")
    assert args.generation_batch_size == 64 * 5 and args.per_device_train_batch_size == 80
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg8 = compose(QWEN + ["trainer.args.gradient_accumulation_steps=1"])
    assert per_device_batch(cfg8) == 40
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        per_device_batch(cfg)


def test_accelerate_configs_parse_with_accelerates_loader():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    want = {"ddp": (DistributedType.MULTI_GPU, None), "deepspeed_zero2": (DistributedType.DEEPSPEED, 2),
            "deepspeed_zero3": (DistributedType.DEEPSPEED, 3), "fsdp": (DistributedType.FSDP, None)}
    found = sorted(p.stem for p in (REPO / "conf" / "accelerate").glob("*.yaml"))
    assert found == sorted(want)
    for name, (kind, stage) in want.items():
        path = REPO / "conf" / "accelerate" / f"{name}.yaml"
        c = load_config_from_file(str(path))
        assert c.distributed_type == kind and c.mixed_precision == "bf16" and c.num_processes == 8
        if stage is not None:
            assert c.deepspeed_config["zero_stage"] == stage
        if name == "fsdp":
            assert c.fsdp_config["fsdp_version"] == 2
        assert f"accelerate launch --config_file conf/accelerate/{name}.yaml -m noisebench.cli" in path.read_text()


# ---- dry run -------------------------------------------------------------------------------------------------------
def test_dry_run_without_hub_or_local_path_fails_with_one_clear_message(tmp_path):
    env = _clean_env(HF_HOME=str(tmp_path / "hf"))  # an empty cache: the model is nowhere
    res = _cli(QWEN + ["dry_run=true", f"results_dir={tmp_path}"], env)
    assert res.returncode == 2, res.stderr[-2000:]
    both = res.stdout + res.stderr
    assert "Traceback" not in both and res.stderr.count("NOT READY") == 1
    assert "testbed.model_path" in res.stderr and "testbed.data.data_dir" in res.stderr
    for line in ("steps           116 x 64 prompts x 5 generations", "GPUs visible here",
                 "rollout engine  transformers generate", "eval schedule   steps [0, 20, 40, 60, 80, 100, 116]"):
        assert line in res.stdout, res.stdout


def _tiny_qwen_folder(path: Path) -> Path:
    """A saved random Qwen2 (2 layers) with a tokenizer that has a chat template: a stand-in local model folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from noisebench.testbeds.tokenizer import build_tokenizer

    tok = build_tokenizer(["Natalia sold 48 clips. How many? #### 72"] * 20, 300)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.skipif(not (SHARED_GSM8K / "train.jsonl").exists(), reason="needs shared/data/gsm8k")
def test_dry_run_with_local_model_and_gsm8k_is_ready(tmp_path):
    model = _tiny_qwen_folder(tmp_path / "model")
    env = _clean_env(HF_HOME=str(tmp_path / "hf"), NOISEBENCH_GSM8K_DIR=str(SHARED_GSM8K))
    res = _cli(QWEN + ["dry_run=true", f"testbed.model_path={model}"], env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"model local folder {model}" in res.stdout and f"data folder {SHARED_GSM8K}" in res.stdout
    assert res.stdout.rstrip().endswith("ready: model, data and config check out")


def test_dry_run_plans_vllm_server_and_refuses_what_cannot_work(monkeypatch):
    from noisebench.train.plan import plan_lines, problems
    from noisebench.train.builders import noise_spec

    cfg = compose(QWEN + ["trainer.args.use_vllm=true", "trainer.args.vllm_mode=server"])
    spec = noise_spec(cfg)
    text = "\n".join(plan_lines(cfg, spec))
    assert "vLLM server, eager" in text and "vllm serve Qwen/Qwen2.5-1.5B-Instruct" in text
    assert "--enforce-eager" in text and "VLLM_SERVER_DEV_MODE=1" in text and '"phases": ["rollout"]' in text
    assert any("vLLM is not installed" in p for p in problems(cfg, spec))
    lazy = compose(QWEN + ["trainer.args.use_vllm=true", "trainer.vllm_enforce_eager=false"])
    assert any("trainer.vllm_enforce_eager=false" in p for p in problems(lazy, noise_spec(lazy)))
    clean = compose(["testbed=qwen2_5_1_5b_gsm8k", "trainer.args.use_vllm=true", "trainer.vllm_enforce_eager=false"])
    assert not any("enforce_eager" in p for p in problems(clean, noise_spec(clean)))  # no rollout noise: allowed
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert any("DeepSpeed ZeRO-3 shards the weights" in p for p in problems(cfg, spec))


# ---- vLLM glue -----------------------------------------------------------------------------------------------------
def test_colocate_keeps_the_plugin_inert_and_forces_eager(monkeypatch):
    from trl.generation import vllm_generation

    from noisebench.noise.vllm_plugin import register
    from noisebench.train.builders import noise_spec
    from noisebench.train.vllm import ENV_ENABLED, vllm_rollouts

    code = inspect.getsource(vllm_generation.VLLMGeneration._init_vllm)
    assert "self.llm = LLM(" in code and "enforce_eager" not in code  # TRL 1.16: module-global LLM, no eager option

    class Recorder:  # stands in for vllm.LLM, which cannot be installed here: records what TRL would pass
        def __init__(self, **kw):
            self.kw = kw

    monkeypatch.setattr(vllm_generation, "LLM", Recorder, raising=False)
    monkeypatch.setenv("VERL_NOISY_OPS_ENABLED", "1")  # a study habit that must not noise the trainer process
    monkeypatch.delenv(ENV_ENABLED, raising=False)
    cfg = compose(QWEN + ["trainer.args.use_vllm=true"])
    with vllm_rollouts(cfg, noise_spec(cfg), "/models/q"):
        assert register() is None and os.environ[ENV_ENABLED] == "0"
        assert vllm_generation.LLM(model="m", seed=0).kw == {"model": "m", "seed": 0, "enforce_eager": True}
    assert vllm_generation.LLM is Recorder and ENV_ENABLED not in os.environ


def test_check_rollout_noise_needs_noisy_rollout_calls():
    import torch
    import torch.nn.functional as F

    from noisebench.noise import NoiseInjector, NoiseSpec
    from noisebench.train.runner import _looks_diverged
    from noisebench.train.vllm import check_rollout_noise, rollout_noise_calls

    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-3, phases=["all"]))
    with inj:
        with pytest.raises(RuntimeError, match="did not reach vLLM") as err:
            check_rollout_noise(inj, "colocate")
        assert not _looks_diverged(err.value)  # reported as failed, not diverged
        check_rollout_noise(inj, "server")  # cannot be checked from the trainer: warns only
        with inj.phase("rollout"):
            F.linear(torch.randn(4, 8), torch.randn(3, 8))
        assert rollout_noise_calls(inj) == 1
        check_rollout_noise(inj, "colocate")
    check_rollout_noise(NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-3, phases=["train_forward"])),
                        "colocate")  # rollout not noised: nothing to check


NOISY_LINEAR = """
import hashlib, json, sys, torch, torch.nn.functional as F
{install}
g = torch.Generator().manual_seed(0)
x, w = torch.randn(256, 512, generator=g), torch.randn(384, 512, generator=g)
y = F.linear(x, w)
{inside}
tel = inj.telemetry() if inj is not None else {{}}
if inj is not None:
    inj.uninstall()
clean = F.linear(x, w)
out = {{"rel": float(((y - clean).square().sum() / clean.square().sum()).sqrt()),
       "sha": hashlib.sha256(y.numpy().tobytes()).hexdigest(),
       "calls": {{k: v for k, v in tel.items() if k.endswith("calls")}},
       "train_clean": bool(torch.equal(globals().get("y_train", clean), clean))}}
print(json.dumps(out))
"""


def _noisy_linear(env: dict, install: str, inside: str = "z = None", cwd: Path = REPO) -> dict:
    code = NOISY_LINEAR.format(install=install, inside=inside)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_install_from_env_with_the_study_variables_seeds_each_rank(tmp_path):
    study = {"VERL_NOISY_OPS_ENABLED": "1", "VERL_NOISY_OPS_SCALE": "1e-3", "PYTHONPATH": str(REPO)}
    install = "from noisebench.noise import install_from_env\ninj = install_from_env()"
    r0, r1, r0b = (_noisy_linear(_clean_env(RANK=r, **study), install) for r in ("0", "1", "0"))
    for r in (r0, r1):
        assert abs(r["rel"] - 1e-3) < 0.03e-3  # fp32: the realized relative error is the scale
        assert r["calls"] == {"noise/global/linear/fwd/calls": 1.0}
    assert r0["sha"] == r0b["sha"] and r0["sha"] != r1["sha"]  # reproducible per rank, different across ranks


def test_server_env_gives_vllm_processes_rollout_only_noise():
    from noisebench.noise import NoiseSpec
    from noisebench.train.vllm import server_env

    spec = NoiseSpec(type="relative_gaussian", scale=1e-3, phases=["all"], seed=7)
    env = _clean_env(PYTHONPATH=str(REPO), **server_env(spec))
    install = "from noisebench.noise.vllm_plugin import register\ninj = register()"
    inside = "with inj.phase('train_forward'):\n    y_train = F.linear(x, w)"
    r = _noisy_linear(env, install, inside)
    assert abs(r["rel"] - 1e-3) < 0.03e-3  # outside any context the plugin's calls count as rollout: noised
    assert r["train_clean"] and r["calls"] == {"noise/rollout/linear/fwd/calls": 1.0}  # train_forward: bitwise clean
    off = server_env(NoiseSpec(type="relative_gaussian", scale=1e-3, phases=["train_forward"]))
    assert off == {"NOISEBENCH_NOISE_ENABLED": "0"}
    r_off = _noisy_linear(_clean_env(PYTHONPATH=str(REPO), VERL_NOISY_OPS_ENABLED="1", **off),
                          "from noisebench.noise.vllm_plugin import register\ninj = register()")
    assert r_off["rel"] == 0.0 and r_off["calls"] == {}


def test_vllm_plugin_entry_point_is_declared_in_the_built_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("noisebench", "conf", "tasks", "leaderboards/reference"):  # the folders the build maps into the package
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "elsewhere"
    run.mkdir()
    # what vLLM's load_plugins_by_group does: entry_points(group=...), then .load() and call
    install = ("import importlib.metadata as md, noisebench\n"
               "eps = {e.name: e for e in md.entry_points(group='vllm.general_plugins')}\n"
               "assert eps['noisebench'].value == 'noisebench.noise.vllm_plugin:register', eps\n"
               f"assert noisebench.__file__.startswith({str(site)!r}), noisebench.__file__\n"
               "inj = eps['noisebench'].load()()")
    env = _clean_env(PYTHONPATH=str(site), VERL_NOISY_OPS_ENABLED="1", VERL_NOISY_OPS_SCALE="1e-3")
    r = _noisy_linear(env, install, cwd=run)
    assert abs(r["rel"] - 1e-3) < 0.03e-3 and r["calls"] == {"noise/rollout/linear/fwd/calls": 1.0}

"""Every preset composes; bad overrides fail with Hydra's clear errors; noise specs are validated."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose

PRESETS = sorted(p.stem for p in (REPO / "conf" / "exp").glob("*.yaml"))
STUDY = {"baseline": ("none", 0.0), "e4b": ("relative_gaussian", 1e-4), "e4c": ("relative_gaussian", 1e-3),
         "e4d": ("relative_gaussian", 1e-2), "e5": ("relative_gaussian", 1e-3)}


def test_all_study_presets_exist():
    for name in ["baseline", "e4b", "e4c", "e4d", "e5", "e6", "aqn", "aqn_e4d"]:
        assert name in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates(name):
    from noisebench.train.builders import noise_spec

    cfg = compose([f"+exp={name}"])
    assert cfg.experiment == name
    spec = noise_spec(cfg)
    assert spec.type == cfg.noise.type
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if name in STUDY:
        assert (cfg.noise.type, float(cfg.noise.scale)) == STUDY[name]
        if name != "baseline":
            assert list(cfg.noise.phases) == ["rollout", "reference", "train_forward", "train_backward", "eval"]
    if name == "e5":
        assert list(cfg.noise.ops) == ["extended"]
    if name.startswith("aqn"):
        assert cfg.aqn.enabled


def test_default_is_embedded_baseline():
    cfg = compose()
    assert cfg.testbed.name == "tiny_sharpen" and cfg.noise.type == "none" and cfg.experiment == "baseline"
    assert cfg.trainer.max_steps == 40 and cfg.eval.eval_every == 10 and cfg.eval.clean_too is True
    assert cfg.trainer.args.bf16 is False and cfg.trainer.args.gradient_checkpointing is False


def test_run_seed_offsets_noise_seed():
    from noisebench.train.builders import noise_spec

    a = noise_spec(compose(["+exp=e4c", "seed=0"]))
    b = noise_spec(compose(["+exp=e4c", "seed=1"]))
    assert a.seed != b.seed


def test_bad_noise_type_is_refused_at_composition_naming_key_and_choices():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(["noise.type=gaussian"])
    cause = str(err.value.__cause__)
    assert "noise.type" in cause and "relative_gaussian" in cause and "bitflip" in cause


def test_bad_group_choice_is_a_clear_hydra_error():
    out = subprocess.run([sys.executable, "-m", "noisebench.cli", "+exp=nope", "--cfg", "job"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Could not find 'exp/nope'" in out.stderr and "e4c" in out.stderr  # Hydra lists the available options
    assert "Traceback" not in out.stderr


def test_cfg_job_prints_composed_config():
    out = subprocess.run([sys.executable, "-m", "noisebench.cli", "+exp=e4c", "--cfg", "job"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.experiment == "e4c" and cfg.noise.scale == 1e-3


def test_run_injector_hooks_only_global_for_colocated_vllm():
    """The run's injector hooks the attached models alone, except with colocated vLLM (its model is never
    attached, so only global hooks reach it); a bad vllm_mode is refused by name."""
    from noisebench.train.builders import injector_hooks

    qwen = ["+exp=e4c", "testbed=qwen2_5_1_5b_gsm8k", "trainer=grpo_qwen"]
    assert injector_hooks(compose(["+exp=e4c"])) == "attached"
    assert injector_hooks(compose(qwen)) == "attached"
    assert injector_hooks(compose(qwen + ["trainer.args.use_vllm=true"])) == "global"   # colocate is the default
    assert injector_hooks(compose(qwen + ["trainer.args.use_vllm=true", "trainer.args.vllm_mode=server"])) == "attached"
    with pytest.raises(ValueError, match="vllm_mode.*colocate"):
        injector_hooks(compose(qwen + ["trainer.args.use_vllm=true", "trainer.args.vllm_mode=remote"]))


def test_run_injector_patches_unless_something_compiles_or_vllm_is_colocated():
    """The run's injector patches the covered spellings (eager TRL training and HF generation), and keeps the mode
    where code may be compiled under it (TRL's torch_compile, a static generation cache) or is colocated vLLM's."""
    from noisebench.train.builders import injector_intercept

    qwen = ["+exp=e4c", "testbed=qwen2_5_1_5b_gsm8k", "trainer=grpo_qwen"]
    assert injector_intercept(compose(["+exp=e4c"])) == "patch"
    assert injector_intercept(compose(qwen)) == "patch"
    assert injector_intercept(compose(qwen + ["trainer.args.use_vllm=true"])) == "mode"
    assert injector_intercept(compose(qwen + ["trainer.args.use_vllm=true", "trainer.args.vllm_mode=server"])) == "patch"
    assert injector_intercept(compose(["+exp=e4c", "+trainer.args.torch_compile=true"])) == "mode"
    assert injector_intercept(compose(["+exp=e4c", "+trainer.args.generation_kwargs.cache_implementation=static"])) \
        == "mode"


def test_schema_choices_are_the_engine_choices():
    """The schema repeats NoiseSpec's choices (importing the engine would load torch before the check)."""
    from noisebench.noise import spec
    from noisebench.schema import nodes

    assert [m.value for m in nodes.NoiseType] == list(spec.NOISE_TYPES)
    assert [m.value for m in nodes.Op] == list(spec.OPS) + list(spec.OP_SETS)
    assert [m.value for m in nodes.Phase] == list(spec.PHASES) + ["all"]
    assert [m.value for m in nodes.RoundFormat] == list(spec.ROUND_FORMATS)
    assert [m.value for m in nodes.Rounding] == list(spec.ROUNDING_MODES)
    assert [m.value for m in nodes.BitField] == list(spec.BIT_FIELDS)


@pytest.mark.parametrize("group, name", [("testbed", "tiny_arith"), ("testbed", "qwen2_5_1_5b_gsm8k"),
                                         ("trainer", "grpo_tiny"), ("trainer", "grpo_qwen")])
def test_schema_keeps_every_value_and_type(group, name):
    """A composed testbed or trainer holds its file's values with their YAML types (the warm-start cache hash and
    the setting fingerprint hash them), plus null for the optional sections the file leaves out."""
    import json

    raw = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / group / f"{name}.yaml"), resolve=False)
    raw = raw.get(group, raw)  # a global-package file nests its keys
    raw.pop("defaults", None)
    composed = OmegaConf.to_container(compose([f"{group}={name}"])[group], resolve=False)

    def same(a, b, path=""):
        for k, v in a.items():
            assert k in b, f"{path}{k} lost"
            if isinstance(v, dict):
                same(v, b[k], f"{path}{k}.")
            else:
                assert json.dumps(b[k]) == json.dumps(v), f"{path}{k}: {b[k]!r} != {v!r}"
        extra = {k: b[k] for k in set(b) - set(a)}
        assert all(v is None for v in extra.values()), f"{path}: schema added values {extra}"

    same(raw, composed)


def test_composed_choices_are_plain_strings_to_the_engine():
    """Schema choices compose as StrEnums; the NoiseSpec and the JSON record see plain strings."""
    import json

    from noisebench.train.runner import noise_spec

    cfg = compose(["+exp=round_fp8"])
    spec = noise_spec(cfg)
    assert type(spec.type) is str and type(spec.round_format) is str and all(type(o) is str for o in spec.ops)
    assert (spec.type, spec.round_format, spec.rounding) == ("round", "fp8_e4m3", "stochastic")
    blob = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    assert blob["noise"]["type"] == "round" and blob["device"] == "auto" and blob["testbed"]["kind"] == "tiny"


def test_noise_spec_is_validated_once_on_the_way_to_the_kernel(monkeypatch):
    """Config -> NoiseSpec -> NoiseInjector checks the spec once; a field changed later is checked again."""
    from noisebench.noise import NoiseInjector, NoiseSpec
    from noisebench.train.runner import noise_spec

    calls = []
    check = NoiseSpec._check
    monkeypatch.setattr(NoiseSpec, "_check", lambda self: calls.append(1) or check(self))
    spec = noise_spec(compose(["+exp=e4c"]))
    NoiseInjector(spec)
    assert len(calls) == 1
    spec.scale = -1.0
    with pytest.raises(ValueError, match="scale"):
        spec.validate()
    assert len(calls) == 2


@pytest.mark.parametrize("overrides, key", [
    (["trainer.num_generations=1"], "trainer.num_generations"),
    (["eval.limit=0"], "eval.limit"),
    (["eval.limit=1.5"], "eval.limit"),
    (["aqn=qerl", "aqn.num_stages=2"], "aqn.num_stages"),
    (["noise=bitflip", "noise.scale=1.5"], "noise.scale"),
    (["+exp=e4c", "noise.ops=[]"], "noise.ops"),
    (["+exp=e4c", "noise.layers=[3,1]"], "noise.layers"),
    (["+exp=e4c", "noise.exclude=['(unclosed']"], "noise.exclude"),
    (["testbed.warmstart.lr=0"], "testbed.warmstart.lr"),
    (["testbed.data.min_ops=4"], "testbed.data.min_ops"),
    (["testbed=qwen2_5_1_5b_gsm8k", "testbed.max_prompt_length=0"], "testbed.max_prompt_length"),
    (["trainer.prompts_per_step=3", "trainer.num_generations=3", "trainer.args.gradient_accumulation_steps=2"],
     "trainer.prompts_per_step"),
])
def test_rules_name_the_key(overrides, key):
    from noisebench.schema import ConfigError, check

    with pytest.raises(ConfigError) as err:
        check(compose(overrides))
    assert err.value.key == key


@pytest.mark.parametrize("overrides", [[], ["+exp=e4c"], ["+exp=bitflip_exponent"], ["+exp=aqn_e4d"],
                                       ["testbed=qwen2_5_1_5b_gsm8k"], ["eval.limit=0.5"], ["eval.limit=48"]])
def test_rules_pass_the_shipped_configs(overrides):
    from noisebench.schema import check

    check(compose(overrides))


def test_eval_only_config_is_typed():
    from hydra.errors import ConfigCompositionException

    from noisebench.schema import check

    cfg = compose(config_name="eval_only")
    check(cfg)
    assert cfg.eval.clean_too is True and cfg.trainer is None
    qwen = compose(["testbed=qwen2_5_1_5b_gsm8k"], config_name="eval_only")  # the file overrides the trainer group
    check(qwen)
    assert qwen.testbed.kind == "hf" and qwen.eval.clean_too is True
    with pytest.raises(ConfigCompositionException):
        compose(["eval.batch_size=many"], config_name="eval_only")


@pytest.mark.parametrize("name", ["tiny_arith", "tiny_sharpen"])
def test_testbed_cache_hash_is_the_same_composed_or_read_raw(name):
    """The schema adds null optional sections and a defaults list to the file; the builder's view (to_plain) and so
    the warm-start cache folder stay those of the file read raw."""
    from noisebench.testbeds.base import check_schema, to_plain
    from noisebench.testbeds.tiny_arith import cache_folder

    raw = to_plain(OmegaConf.load(REPO / "conf" / "testbed" / f"{name}.yaml"))
    composed = to_plain(compose([f"testbed={name}"]).testbed)
    null_section = {"tiny_arith": "mistakes", "tiny_sharpen": "format"}[name]  # unset in the file: null in the schema
    assert "defaults" not in raw and null_section not in composed["warmstart"]
    assert composed == raw and cache_folder(composed, "/c") == cache_folder(raw, "/c")
    check_schema(raw)


@pytest.mark.parametrize("over, match", [
    ({"warmstart": {"steps": "many"}}, r"testbed.warmstart.steps='many' is not an integer"),
    ({"data": {"ops": ["add", "pow"]}}, r"testbed.data.ops\[1\]='pow'; valid choices: \['add', 'sub', 'mul', 'div'\]"),
    ({"data": {"min_ops": 3, "max_ops": 2}}, r"testbed.data.min_ops: must be <= testbed.data.max_ops"),
    ({"warmstart": {"lr": -1.0}}, r"testbed.warmstart.lr: must be > 0"),
    ({"model": {"hidden_sise": 64}}, r"testbed.model has unknown keys \['hidden_sise'\]; valid keys: \['hidden_size'"),
])
def test_check_schema_names_the_key_without_hydra(over, match):
    from noisebench.testbeds.base import check_schema, to_plain

    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "testbed" / "tiny_arith.yaml"), over)
    with pytest.raises(ValueError, match=match):
        check_schema(to_plain(cfg))


@pytest.mark.parametrize("env, match", [
    ({"NOISEBENCH_NOISE_TYPE": "relative_gaussian", "NOISEBENCH_NOISE_SCALE": "abc"},
     r"NOISEBENCH_NOISE_SCALE='abc' is not a number"),
    ({"NOISEBENCH_NOISE_TYPE": "bitflip", "NOISEBENCH_NOISE_SEED": "1.5"},
     r"NOISEBENCH_NOISE_SEED='1.5' is not an integer"),
    ({"VERL_NOISY_OPS_ENABLED": "1", "VERL_NOISY_OPS_SCALE": "x"}, r"VERL_NOISY_OPS_SCALE='x' is not a number"),
    ({"NOISEBENCH_NOISE_SPEC": "{type: round}"}, r"NOISEBENCH_NOISE_SPEC is not a JSON object"),
])
def test_engine_env_errors_name_the_variable(env, match):
    from noisebench.noise.env import spec_from_env

    with pytest.raises(ValueError, match=match):
        spec_from_env(env)


def test_mistake_rule_choices_are_the_testbeds():
    from noisebench.schema.testbed import Mistake
    from noisebench.testbeds.arith import MISTAKES

    assert [m.value for m in Mistake] == list(MISTAKES)


def test_engine_schema_choices_are_the_engines():
    from noisebench.noise.engine import SWITCHES
    from noisebench.schema import nodes

    typed = {"fast": nodes.FastMode, "compiled": nodes.CompiledDraw, "cpu_rng": nodes.CpuRng,
             "intercept": nodes.Intercept}
    for key, enum in typed.items():
        assert [m.value for m in enum] == list(SWITCHES[key][0]), key

"""install_from_env in fresh processes (VERL_NOISY_OPS_* aliases, NOISEBENCH_NOISE_*), the vLLM plugin, spec parsing."""
import json
import os
import subprocess
import sys

import pytest

from noisebench.noise import NoiseSpec, spec_from_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A worker that knows nothing of phases: it installs from the environment and runs a Linear forward+backward.
WORKER = """
import json, torch
{install}
torch.manual_seed(0)
lin = torch.nn.Linear(64, 64)
x = torch.randn(256, 64, requires_grad=True)
inj = current()
inj.uninstall()
clean = lin(x).detach()
inj.install()
y = lin(x)
y.sum().backward()
print(json.dumps({{"tel": inj.telemetry(), "rel": ((y.detach() - clean) / clean).std().item(),
                  "spec": inj.spec.to_dict()}}))
"""


def _run(env_vars, install="from noisebench.noise.env import install_from_env, current; install_from_env()"):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOISEBENCH_NOISE_", "VERL_NOISY_OPS_"))}
    env.update(env_vars, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", WORKER.format(install=install)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_study_aliases_noise_every_call_forward_and_backward():
    out = _run({"VERL_NOISY_OPS_ENABLED": "1", "VERL_NOISY_OPS_SCALE": "1e-2",
                "VERL_NOISY_OPS_TYPE": "relative_gaussian"})
    assert out["spec"]["type"] == "relative_gaussian" and out["spec"]["scale"] == 1e-2
    assert out["rel"] == pytest.approx(1e-2, rel=0.05)
    tel = out["tel"]
    assert tel["noise/global/linear/fwd/calls"] == 1 and tel["noise/global/linear/bwd/calls"] == 3


def test_noisebench_vars_win_and_vllm_plugin_counts_as_rollout():
    out = _run({"VERL_NOISY_OPS_ENABLED": "1", "VERL_NOISY_OPS_SCALE": "1e-1",
                "NOISEBENCH_NOISE_SCALE": "2e-2", "NOISEBENCH_NOISE_PHASES": "rollout,eval"},
               install="from noisebench.noise.vllm_plugin import register; from noisebench.noise.env import current; "
                       "import sys; register(); assert 'vllm' not in sys.modules")
    assert out["spec"]["scale"] == 2e-2 and out["spec"]["phases"] == ["rollout", "eval"]
    assert out["rel"] == pytest.approx(2e-2, rel=0.05)
    assert out["tel"]["noise/rollout/linear/fwd/calls"] == 1
    assert not any("/bwd/" in k for k in out["tel"])            # rollout semantics: no backward noise


def test_spec_from_env_parsing_and_errors():
    assert spec_from_env({}) is None
    assert spec_from_env({"VERL_NOISY_OPS_ENABLED": "0", "VERL_NOISY_OPS_SCALE": "1e-3"}) is None
    s = spec_from_env({"VERL_NOISY_OPS_ENABLED": "true", "VERL_NOISY_OPS_ALL_OPS": "1"})
    assert s.type == "relative_gaussian" and s.ops == ["extended", "layer_norm"] and s.scale == 1e-4
    s = spec_from_env({"NOISEBENCH_NOISE_SPEC": json.dumps({"type": "round", "round_format": "fp8_e4m3"}),
                       "NOISEBENCH_NOISE_LAYERS": "2,5", "NOISEBENCH_NOISE_ROUNDING": "stochastic"})
    assert (s.type, s.round_format, s.rounding, s.layers) == ("round", "fp8_e4m3", "stochastic", [2, 5])
    assert spec_from_env({"NOISEBENCH_NOISE_TYPE": "bitflip", "NOISEBENCH_NOISE_ENABLED": "0"}) is None
    with pytest.raises(ValueError, match="NOISEBENCH_NOISE_SCAEL"):
        spec_from_env({"NOISEBENCH_NOISE_SCAEL": "1"})
    with pytest.raises(ValueError, match="valid choices"):
        spec_from_env({"NOISEBENCH_NOISE_TYPE": "gaussian"})


def test_spec_validation_names_key_and_choices():
    bad = [(dict(type="gauss"), "type"), (dict(type="relative_gaussian", scale=-1.0), "scale"),
           (dict(type="relative_gaussian", ops=["conv2d"]), "ops"), (dict(type="relative_gaussian", ops=[]), "ops"),
           (dict(phases=["training"]), "phases"), (dict(round_format="fp4"), "round_format"),
           (dict(rounding="up"), "rounding"), (dict(bits="low"), "bits"), (dict(layers=[3, 1]), "layers"),
           (dict(exclude=["(unclosed"]), "exclude"), (dict(type="bitflip", scale=2.0), "scale")]
    for kw, key in bad:
        with pytest.raises(ValueError, match=key):
            NoiseSpec(**kw).validate()
    with pytest.raises(ValueError, match="linear"):
        NoiseSpec(type="relative_gaussian", ops=["conv2d"]).validate()
    with pytest.raises(ValueError, match="unknown key"):
        NoiseSpec.from_dict({"typ": "none"})


def test_spec_dict_and_omegaconf_round_trip():
    from omegaconf import OmegaConf

    spec = NoiseSpec(type="round", ops=["extended", "rms_norm"], phases=["all"], layers=[0, 3], rounding="stochastic")
    assert NoiseSpec.from_dict(spec.to_dict()) == spec
    node = OmegaConf.structured(NoiseSpec)
    node.type, node.scale, node.ops = "relative_gaussian", 1e-3, ["matmul_family"]
    got = NoiseSpec.from_dict(node)
    assert got.type == "relative_gaussian" and got.resolved_ops() == frozenset(
        ["linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum"])
    assert NoiseSpec.from_dict({"phases": "all"}).resolved_phases() == frozenset(
        ["rollout", "reference", "train_forward", "train_backward", "eval"])
    assert NoiseSpec.from_dict(OmegaConf.create({"type": "bitflip", "scale": 1e-6, "bits": "exponent"})).bits == "exponent"

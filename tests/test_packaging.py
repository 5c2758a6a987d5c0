"""The package as a user installs it: a built wheel carries configs, task YAMLs and reference figures and runs from
any directory; ``noisebench --version`` and ``python -m noisebench`` answer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import noisebench
from conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

SMALL_TESTBED = ["testbed.warmstart.steps=0", "testbed.data.n_train=200", "testbed.data.n_test=16",
                 "testbed.max_completion_length=8"]


def _packages() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists packages by hand (the data folders are mapped in): a new subpackage must be added there."""
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "noisebench").rglob("__init__.py")}
    assert found <= set(_packages()), sorted(found - set(_packages()))


@pytest.mark.parametrize("cmd", [["-m", "noisebench"], ["-m", "noisebench.cli"]])
def test_version_flag(cmd):
    out = subprocess.run([sys.executable, *cmd, "--version"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"noisebench {noisebench.__version__}"


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """(venv python's bin folder, the wheel): the wheel built from this checkout, installed non-editable into a fresh
    venv that sees the system's packages for the dependencies (nothing is downloaded)."""
    tmp = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(tmp / "dist"), str(REPO)], capture_output=True, text=True,
                         timeout=300, cwd=tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("noisebench-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], check=True,
                   timeout=300)
    bin_dir = tmp / "venv" / "bin"
    res = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--ignore-installed", str(whl)], capture_output=True, text=True, timeout=300, cwd=tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    return bin_dir, whl


def _clean_env(**extra) -> dict:
    """No PYTHONPATH (it would import the checkout) and no resource overrides: what a user's shell has."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "NOISEBENCH_CONF_DIR", "NOISEBENCH_TASKS_DIR")}
    return {**env, **extra}


def _in_venv(bin_dir: Path, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env=_clean_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "not a git repository" not in out.stderr  # nothing asks git outside a checkout
    return out


@pytest.mark.slow
def test_installed_wheel_runs_from_another_directory(wheel_venv, tmp_path, cache_dir):
    bin_dir, whl = wheel_venv
    names = set(zipfile.ZipFile(whl).namelist())   # every config, task file, reference figure and module ships
    for f in [*REPO.glob("conf/**/*.yaml"), *REPO.glob("tasks/noisebench/*"), *REPO.glob("leaderboards/reference/*")]:
        if f.is_file():
            rel = f.relative_to(REPO).as_posix().replace("leaderboards/reference", "reference")
            assert f"noisebench/{rel}" in names, rel
    for f in (REPO / "noisebench").rglob("*.py"):
        assert f.relative_to(REPO).as_posix() in names, f

    elsewhere = tmp_path / "elsewhere"   # no conf/, no tasks/, not a git checkout
    elsewhere.mkdir()
    probe = ("import json, noisebench\n"
             "from noisebench.evaluate import tasks_dir\n"
             "from noisebench.leaderboard.reference import REFERENCE_DIR\n"
             "from noisebench.train.provenance import git_commit\n"
             "print(json.dumps({'file': noisebench.__file__, 'tasks': str(tasks_dir()),\n"
             "                  'reference': sorted(p.name for p in REFERENCE_DIR.glob('*.yaml')),\n"
             "                  'commit': git_commit()}))")
    found = json.loads(_in_venv(bin_dir, ["python", "-c", probe], elsewhere).stdout)
    venv = bin_dir.parent.resolve()
    assert Path(found["file"]).resolve().is_relative_to(venv), found  # the wheel's noisebench, not the checkout's
    assert Path(found["tasks"]).resolve().is_relative_to(venv), found
    assert found["reference"] == sorted(p.name for p in (REPO / "leaderboards/reference").glob("*.yaml"))
    assert found["commit"] is None

    assert _in_venv(bin_dir, ["noisebench", "--version"], elsewhere).stdout.strip() == \
        f"noisebench {noisebench.__version__}"
    cfg = OmegaConf.create(_in_venv(bin_dir, ["noisebench", "+exp=e4c", "--cfg", "job"], elsewhere).stdout)
    assert cfg.experiment == "e4c" and cfg.noise.type == "relative_gaussian" and cfg.noise.scale == 1e-3
    assert list(cfg.noise.ops) == ["matmul_family"]

    # a tiny random Qwen2 saved to disk, scored by the installed noisebench-eval through lm-eval's task YAMLs
    from noisebench.testbeds import load_testbed

    from conftest import compose

    tb = load_testbed(compose(SMALL_TESTBED).testbed, cache_dir=cache_dir)
    ckpt = Path(tb.model_path)
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
    out = _in_venv(bin_dir, ["noisebench-eval", f"checkpoint={ckpt}", *SMALL_TESTBED, "noise=relative_gaussian",
                             "noise.scale=0.3", "eval.limit=8", "eval.batch_size=8", f"results_dir={tmp_path}",
                             f"cache_dir={cache_dir}", "device=cpu"], elsewhere)
    assert "noisy, n=8" in out.stdout
    (rec_path,) = tmp_path.rglob("eval_record.json")
    rec = json.loads(rec_path.read_text())
    assert rec["checkpoint"] == str(ckpt) and rec["task"] == "noisebench_arith"
    assert len(rec["per_item"]) == len(rec["per_item_clean"]) == 8
    assert rec["telemetry"]["noise/eval/linear/fwd/calls"] > 0   # noise reached the model lm-eval ran
    assert not list(elsewhere.iterdir())   # results went where results_dir says, nothing into the cwd

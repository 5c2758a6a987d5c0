"""Which run ``resume=true`` continues, and from which checkpoint: folders on disk, no training (fast)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO

from noisebench.record import run_fingerprint
from noisebench.train import rundirs


def _cfg(**over) -> dict:
    cfg = {"testbed": {"name": "tb", "seed": 0}, "trainer": {"max_steps": 4}, "eval": {"limit": 8, "eval_every": 2},
           "noise": {"type": "relative_gaussian", "scale": 0.01}, "aqn": {"enabled": False}, "seed": 0}
    for k, v in over.items():
        cfg[k] = v
    return cfg


def _run_folder(root: Path, name: str, cfg: dict | None, ckpt_steps=(), status=None) -> Path:
    d = root / "tb" / "exp" / name
    d.mkdir(parents=True)
    if cfg is not None:
        rundirs.begin_run(d, cfg, resume=False)
    for step in ckpt_steps:
        c = d / "checkpoints" / f"checkpoint-{step}"
        c.mkdir(parents=True)
        (c / "model.safetensors").write_bytes(bytes(range(256)) * (step + 1))
        (c / "trainer_state.json").write_text("{}")
        rundirs.mark_checkpoint(c)
    if status is not None:
        (d / "record.json").write_text(json.dumps({"status": status}))
    return d


def test_resume_skips_empty_failed_and_finished_folders_and_picks_matching_config(tmp_path):
    cfg, other = _cfg(), _cfg(noise={"type": "relative_gaussian", "scale": 0.02})
    want = _run_folder(tmp_path, "20260101-000000-s0", cfg, ckpt_steps=[2, 4])
    _run_folder(tmp_path, "20260101-000001-s0", other, ckpt_steps=[2])             # newer, another noise scale
    _run_folder(tmp_path, "20260101-000002-s0", cfg, ckpt_steps=[2, 4], status="ok")  # finished: nothing to resume
    _run_folder(tmp_path, "20260101-000003-s0", cfg)                                 # died before its checkpoint
    _run_folder(tmp_path, "20260101-000004-s0", None)                                # a launch that failed: empty
    _run_folder(tmp_path, "20260101-000005-s1", cfg, ckpt_steps=[2])                 # another seed
    found = rundirs.find_resumable(str(tmp_path), "tb", "exp", 0, run_fingerprint(cfg))
    assert found == want
    # no folder of this config: the newest one with a checkpoint, which the runner then refuses (below)
    third = _cfg(seed=0, aqn={"enabled": True})
    assert rundirs.find_resumable(str(tmp_path), "tb", "exp", 0, run_fingerprint(third)).name == "20260101-000001-s0"
    assert rundirs.find_resumable(str(tmp_path), "tb", "other", 0, run_fingerprint(cfg)) is None


def test_resume_refuses_another_config_naming_the_keys(tmp_path):
    d = _run_folder(tmp_path, "20260101-000000-s0", _cfg(), ckpt_steps=[2])
    changed = _cfg(noise={"type": "relative_gaussian", "scale": 0.02}, trainer={"max_steps": 4})
    with pytest.raises(ValueError, match=r"noise\.scale: 0\.01 -> 0\.02") as err:
        rundirs.begin_run(d, changed, resume=True)
    assert "trainer" not in str(err.value)  # only what differs is named
    same = rundirs.begin_run(d, _cfg(), resume=True)
    assert same["wandb_id"] == rundirs.read_run_file(d)["wandb_id"]  # one wandb run across launches


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    d = _run_folder(tmp_path, "20260101-000000-s0", _cfg(), ckpt_steps=[2, 4, 6])
    assert rundirs.last_good_checkpoint(d).name == "checkpoint-6"
    weights = d / "checkpoints" / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])                    # truncated
    flipped = d / "checkpoints" / "checkpoint-4" / "model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[7] ^= 1
    flipped.write_bytes(bytes(data))                                   # same size, one bit flipped
    assert rundirs.last_good_checkpoint(d).name == "checkpoint-2"
    (d / "checkpoints" / "checkpoint-2" / rundirs.CHECKPOINT_MARKER).unlink()  # killed before the seal
    assert rundirs.last_good_checkpoint(d) is None
    assert rundirs.find_resumable(str(tmp_path), "tb", "exp", 0) is None


def test_damaged_checkpoints_are_moved_out_of_the_trainers_sight(tmp_path):
    d = _run_folder(tmp_path, "20260101-000000-s0", _cfg(), ckpt_steps=[2, 4])
    (d / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    (d / "progress.json").write_text(json.dumps({"curve": [{"step": 0}, {"step": 2}, {"step": 4}],
                                                 "reward_curve": [{"step": s} for s in (1, 2, 3, 4)]}))
    ckpt, history = rundirs.resume_point(d, resume=True)
    assert Path(ckpt).name == "checkpoint-2"
    assert [c["step"] for c in history.curve] == [0, 2] and len(history.reward_curve) == 2
    names = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert names[0] == "checkpoint-2" and names[1].startswith("corrupt-checkpoint-4-")


def _compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from noisebench.schema import register

    rundirs.register_resolvers()
    register()  # the schemas conf/ names in its defaults lists
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_hydra_run_dir_resolves_to_the_matching_run(tmp_path):
    """The resolver sees the whole composed config (``_root_``): the folder Hydra logs into is the one resumed."""
    over = [f"results_dir={tmp_path}", "resume=true", "logger=none", "trainer.max_steps=3"]
    cfg = _compose_with_hydra(over)
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra")
    task = OmegaConf.to_container(OmegaConf.create(plain), resolve=True)
    name = cfg.testbed.name
    match = tmp_path / name / cfg.experiment / "20260101-000000-s0"
    match.mkdir(parents=True)
    rundirs.begin_run(match, task, resume=False)
    c = match / "checkpoints" / "checkpoint-2"
    c.mkdir(parents=True)
    (c / "trainer_state.json").write_text("{}")
    rundirs.mark_checkpoint(c)
    rundirs._subdir.cache_clear()
    assert Path(cfg.hydra.run.dir) == match
    rundirs._subdir.cache_clear()
    other = _compose_with_hydra(over[:-1] + ["trainer.max_steps=5"])
    assert Path(other.hydra.run.dir) == match  # the only candidate: the runner refuses it, naming max_steps


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    from conftest import compose
    from omegaconf import OmegaConf

    from noisebench.train.tracking import Tracker

    cfg = compose(["logger=wandb", f"results_dir={tmp_path}"])
    rundirs.begin_run(tmp_path, OmegaConf.to_container(cfg, resolve=True), resume=False)
    wandb_id = rundirs.read_run_file(tmp_path)["wandb_id"]
    for step in (1, 2):  # a launch, then its resume
        tracker = Tracker(cfg, tmp_path, tags=["test"])
        assert tracker.run.id == wandb_id
        tracker.log({"train/reward": 0.5}, step=step)
        tracker.finish({"status": "ok"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    # wandb names each launch's folder offline-run-<time>-<id>, with -1, -2 ... when two start within one second
    assert runs and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{wandb_id}(-\d+)?", p.name) for p in runs)

"""The result record: one self-describing JSON file per run, written atomically. The leaderboard reads only these.

Imports nothing of noisebench, so the leaderboard can load records without torch.

Schema (``schema: 1``); every key lives inside the record, never in the file name:

- ``run_id`` (str), ``testbed`` (str), ``experiment`` (str), ``seed`` (int)
- ``status``: ``running`` | ``ok`` | ``diverged`` (loss/reward NaN or inf) | ``failed`` (exception) |
  ``interrupted`` (SIGINT/SIGTERM: the partial curve is kept and ``resume=true`` continues it)
- ``noise``: the NoiseSpec as a dict (``type``, ``scale``, ``ops``, ``phases``, ...); ``aqn``: AQN settings dict
- ``config``: the composed, resolved Hydra config; ``versions``: package versions; ``git_commit``
- ``eval_task`` (str), ``n_test`` (int): the lm-eval task and number of test items scored per checkpoint
- ``curve``: list of ``{step, acc, acc_flexible, acc_stderr, acc_clean, acc_clean_flexible}`` (fractions 0..1;
  ``acc`` = strict exact match under the eval phase's noise; ``acc_clean*`` None unless ``eval.clean_too``)
- ``final``: ``{step, acc, acc_flexible, acc_clean, per_item, per_item_clean}``; ``per_item`` is the strict 0/1
  vector of the last checkpoint ordered by lm-eval ``doc_id``
- ``reward_curve``: list of ``{step, reward}`` (mean training reward of the step's rollouts)
- ``mismatch``: ``{mean_kl, mean_abs_prob_diff, max_abs_prob_diff, mean_abs_logp_diff, per_step: [{step, ...}]}``
- ``telemetry``: flat dict from the noise injector (``noise/<phase>/<op>/<dir>/<stat>``)
- ``steps`` (int, steps done), ``max_steps`` (int), ``wall_time_s`` (float), ``started_at``, ``finished_at`` (ISO)
- ``error`` (str or None)
- ``lm_eval_command`` (str or None): the stock ``lm_eval`` command that scores the final checkpoint clean
  (``noisebench.train.rescore``)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
STATUSES = ("running", "ok", "diverged", "failed", "interrupted")
RECORD_NAME = "record.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _jsonable(obj: Any) -> Any:
    """Make NaN/inf JSON-safe (as null) and turn tuples/sets/numpy scalars into plain types."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text so a reader never sees a partial file: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared and read by others
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_record(path: str | os.PathLike, record: dict) -> None:
    """Validate the minimal keys and write the record atomically as sorted, indented JSON."""
    for key in ("run_id", "testbed", "experiment", "seed", "status"):
        if key not in record:
            raise KeyError(f"result record lacks required key {key!r}")
    if record["status"] not in STATUSES:
        raise ValueError(f"record status {record['status']!r} is not one of {list(STATUSES)}")
    record = {"schema": SCHEMA_VERSION, **record}
    write_atomic(path, json.dumps(_jsonable(record), indent=1, sort_keys=True) + "\n")


def read_record(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def find_records(root: str | os.PathLike) -> list[Path]:
    """Every ``record.json`` under root, sorted by path (deterministic)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(root.rglob(RECORD_NAME))


def load_records(root: str | os.PathLike, statuses: Iterable[str] | None = None) -> list[dict]:
    """Load all records under root; skip unreadable files (a run killed mid-write leaves none: writes are atomic)."""
    out = []
    for p in find_records(root):
        try:
            rec = read_record(p)
        except (OSError, json.JSONDecodeError):
            continue
        if statuses is not None and rec.get("status") not in statuses:
            continue
        rec.setdefault("_path", str(p))
        out.append(rec)
    return out


#: Config groups that make an arm differ from the baseline (what the board compares), not the setting it runs in.
TREATMENT_KEYS = ("noise", "aqn", "mitigation", "chip")
#: Evaluation keys that change the scores themselves (the rest only choose when or how often to score).
SCORE_EVAL_KEYS = ("limit", "max_gen_toks")


def setting(config: dict) -> dict:
    """What must match for two runs to be compared: testbed (data, model, warm start), trainer, scoring, device."""
    ev = config.get("eval") or {}
    return {"testbed": config.get("testbed"), "trainer": config.get("trainer"),
            "eval": {k: ev.get(k) for k in SCORE_EVAL_KEYS}, "device": config.get("device")}


def _drop_none(obj: Any) -> Any:
    """Null keys mean "the builder's default": a section added to a schema as null must not change the setting."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def setting_fingerprint(config: dict) -> str:
    """Short stable hash of :func:`setting` (sorted JSON), stored in records and compared by the board and resume."""
    blob = json.dumps(_drop_none(_jsonable(setting(config))), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_setting(config: dict) -> dict:
    """What must match for ``resume=true`` to continue a run: its :func:`setting` plus everything else that changes
    the trained weights or the scores (noise, AQN, seed, the whole eval block: its schedule sets the checkpoints)."""
    out = {**setting(config), "noise": config.get("noise"), "aqn": config.get("aqn"), "seed": config.get("seed"),
           "eval": config.get("eval")}
    if (config.get("mitigation") or {}).get("enabled"):  # only when on: unmitigated runs keep their fingerprint
        out["mitigation"] = config["mitigation"]
    if config.get("chip"):  # likewise: runs without a chip keep their fingerprint
        out["chip"] = config["chip"]
    return out


def run_fingerprint(config: dict) -> str:
    """Short stable hash of :func:`run_setting`, stored in the run folder at start and checked on resume."""
    blob = json.dumps(_jsonable(run_setting(config)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

"""The leaderboard end to end on synthetic records written with the real record schema (noisebench.leaderboard)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from noisebench.leaderboard import build_leaderboards
from noisebench.leaderboard.cli import main as cli_main
from noisebench.leaderboard.reference import REFERENCE_DIR
from noisebench.leaderboard.synthetic import arm_matrix, item_difficulty, make_record, write_run
from noisebench.leaderboard.table import experiments_frame, runs_frame
from noisebench.record import load_records

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def rg(scale, **kw):
    return {"type": "relative_gaussian", "scale": scale, "ops": ["matmul_family"], "phases": ["all"], **kw}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """tiny_arith: baseline + a scale sweep with known effects, a diverged, a failed and a running run;
    qwen2_5_1_5b_gsm8k: single-seed pair; nobase: no baseline; returns (root, per_item dict)."""
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    p = item_difficulty(1000, rng)
    vec = {}
    arms = {"baseline": (None, 0.0), "e4b": (rg(1e-4), 0.0), "e4c": (rg(1e-3), 0.0), "e4d": (rg(1e-2), -0.1),
            "harsh": (rg(1e-1), -0.3)}
    for name, (noise, effect) in arms.items():
        Y = arm_matrix(p, 3, effect, rng)
        vec[name] = Y
        for s in range(3):
            write_run(root, make_record("tiny_arith", name, s, Y[s], noise=noise, wall_time_s=60.0 * (s + 1)))
    write_run(root, make_record("tiny_arith", "bitflip_exponent", 0, None, status="diverged",
                                noise={"type": "bitflip", "scale": 1e-4, "ops": ["linear"], "phases": ["all"],
                                       "bits": "exponent"}))
    write_run(root, make_record("tiny_arith", "e5", 0, None, status="failed", noise=rg(1e-3)))
    write_run(root, make_record("tiny_arith", "e6", 1, None, status="running", noise=rg(1e-3)))
    write_run(root, make_record("tiny_arith", "short_eval", 0, arm_matrix(p[:900], 1, 0.0, rng)[0], noise=rg(1e-3)))
    q = item_difficulty(1319, rng)
    for name, noise, eff in (("baseline", None, 0.0), ("e4c", rg(1e-3), 0.0)):
        vec["q_" + name] = arm_matrix(q, 1, eff, rng)
        write_run(root, make_record("qwen2_5_1_5b_gsm8k", name, 0, vec["q_" + name][0], noise=noise))
    write_run(root, make_record("nobase", "e4c", 0, arm_matrix(p, 1, 0.0, rng)[0], noise=rg(1e-3)))
    return root, vec


@pytest.fixture(scope="module")
def boards(results, tmp_path_factory):
    root, _ = results
    out = tmp_path_factory.mktemp("boards")
    paths = build_leaderboards(str(root), str(out), n_boot=1000)
    return out, paths


def tiny_frame(root):
    runs = runs_frame(load_records(root))
    return experiments_frame(runs[runs.testbed == "tiny_arith"].reset_index(drop=True), n_boot=1000)


def test_deltas_verdicts_and_ranking(results):
    root, vec = results
    exps, notes = tiny_frame(root)
    row = exps.set_index("experiment")
    for name in ("e4b", "e4c", "e4d", "harsh"):
        assert row.loc[name, "delta"] == pytest.approx(vec[name].mean() - vec["baseline"].mean(), abs=1e-12)
        assert row.loc[name, "acc"] == pytest.approx(vec[name].mean(), abs=1e-12)
        assert row.loc[name, "delta_method"] == "seeds x items (t)"
    assert row.loc["harsh", "verdict"] == "degraded" and row.loc["e4d", "verdict"] == "degraded"
    assert row.loc["e4b", "verdict"] == "no significant change" == row.loc["e4c", "verdict"]
    assert row.loc["bitflip_exponent", "verdict"] == "diverged"
    assert row.loc["baseline", "verdict"] == "baseline" and row.loc["baseline", "n_seeds"] == 3
    deltas = exps.delta.where(~exps.is_baseline, 0.0).dropna().tolist()
    assert deltas == sorted(deltas, reverse=True)  # ranked by delta, best first; NaN (diverged) last
    assert set(exps.experiment.iloc[-2:]) == {"bitflip_exponent", "short_eval"}  # no delta: ranked last
    assert row.loc["short_eval", "verdict"] == "n/a"
    assert "e5" not in set(exps.experiment) and "e6" not in set(exps.experiment)  # failed/running not ranked
    assert np.isnan(row.loc["short_eval", "delta"]) and any("900 items" in n for n in notes)
    assert row.loc["baseline", "wall_time_s"] == pytest.approx(120.0)


def test_markdown_sections(boards):
    out, paths = boards
    md = (out / "tiny_arith.md").read_text()
    assert "noisebench-leaderboard --results" in md and "## Legend" in md
    ranking = md.split("## Ranking")[1].split("## Degradation")[0]
    assert "**degraded**" in ranking and "**diverged**" in ranking and "`e5`" not in ranking
    unranked = md.split("## Not ranked")[1].split("## Reference")[0]
    assert "`e5`" in unranked and "failed" in unranked and "running" in unranked
    thresholds = md.split("## Degradation thresholds")[1].split("## ")[0]
    assert "| 1e-02 " in thresholds and "6×" in thresholds  # e4d: smallest degraded scale, 6x bf16 rounding
    assert "| 0.6×" in ranking  # e4c's 1e-3 in bf16-rounding units
    assert "tiny_arith_curves.png" in md and "tiny_arith_tolerance.png" in md
    nobase = (out / "nobase.md").read_text()
    assert "No baseline" in nobase and "**degraded**" not in nobase
    assert {p.name for p in paths} >= {"tiny_arith.md", "tiny_arith_curves.png", "tiny_arith_tolerance.png",
                                       "qwen2_5_1_5b_gsm8k.md", "nobase.md"}


def test_single_seed_pair_gets_mcnemar(results, boards):
    root, vec = results
    runs = runs_frame(load_records(root))
    exps, _ = experiments_frame(runs[runs.testbed == "qwen2_5_1_5b_gsm8k"].reset_index(drop=True), n_boot=1000)
    row = exps.set_index("experiment").loc["e4c"]
    a, b = vec["q_e4c"][0], vec["q_baseline"][0]
    assert row.delta_method == "paired bootstrap (items)" and 0 < row.mcnemar_p <= 1
    assert row.delta_lo < a.mean() - b.mean() < row.delta_hi


def test_reference_rows_present_and_marked_external(boards, tmp_path, results):
    out, _ = boards
    qwen = (out / "qwen2_5_1_5b_gsm8k.md").read_text()
    section = qwen.split("## Reference: the original study (EXTERNAL")[1]
    assert "EXTERNAL: `e4b`" in section and "77.33" in section and "76.88" in section and "+0.45" in section
    assert "## Ranking" not in section  # the external rows are not in the own ranking
    ranking = qwen.split("## Ranking")[1].split("## ")[0]
    assert "EXTERNAL" not in ranking and "77.33" not in ranking
    tiny = (out / "tiny_arith.md").read_text()
    assert "## Reference (external, not comparable)" in tiny and "EXTERNAL" in tiny
    # The project's own copy is read, not ../shared; and the numbers come from the data file.
    assert REFERENCE_DIR == ROOT / "leaderboards" / "reference" and (REFERENCE_DIR / "e4-verl-a100.yaml").exists()
    ref = tmp_path / "ref"
    ref.mkdir()
    text = (REFERENCE_DIR / "e4-verl-a100.yaml").read_text().replace("116: [77.33, 82.5]", "116: [71.11, 82.5]")
    (ref / "e4-verl-a100.yaml").write_text(text)
    build_leaderboards(str(results[0]), str(tmp_path / "o"), n_boot=200, testbeds=["qwen2_5_1_5b_gsm8k"],
                       reference_dir=ref, plots=False)
    assert "71.11" in (tmp_path / "o" / "qwen2_5_1_5b_gsm8k.md").read_text()


def test_regeneration_is_byte_identical(results, boards, tmp_path):
    root, _ = results
    out, paths = boards
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}
    again = build_leaderboards(str(root), str(out), n_boot=1000)
    assert [p.name for p in again] == [p.name for p in paths]
    for p in again:
        assert p.read_bytes() == before[p.name][0], p.name
        assert p.stat().st_mtime_ns == before[p.name][1], p.name  # unchanged files are not rewritten
    assert b"Software" not in (out / "tiny_arith_curves.png").read_bytes()
    for p in again:  # and from scratch: the same bytes again
        p.unlink()
    build_leaderboards(str(root), str(out), n_boot=1000)
    assert all(p.read_bytes() == before[p.name][0] for p in again)


def test_cli_on_a_temp_folder_writes_markdown_and_pngs(results, tmp_path, capsys):
    import matplotlib.image as mpimg

    root, _ = results
    out = tmp_path / "lb"
    assert cli_main(["--results", str(root), "--out", str(out), "--testbed", "tiny_arith", "--bootstrap", "500"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / n) for n in ("tiny_arith.md", "tiny_arith_curves.png", "tiny_arith_tolerance.png")]
    img = mpimg.imread(out / "tiny_arith_curves.png")
    assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # a real, non-blank figure
    assert cli_main(["--results", str(root), "--out", str(out), "--testbed", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli_main(["--results", str(tmp_path / "empty"), "--out", str(out)]) == 1


def test_leaderboard_never_imports_torch(results, tmp_path):
    code = ("import sys; from noisebench.leaderboard.cli import main; "
            f"rc = main(['--results', {str(results[0])!r}, '--out', {str(tmp_path)!r}, '--bootstrap', '200']); "
            "assert rc == 0; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'noisebench')))")
    res = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    mods = json.loads(res.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert not any(m.startswith("torch") for m in mods)
    assert {m.split(".")[1] for m in mods if m.count(".") >= 1} <= {"leaderboard", "record"}


def test_hydra_multirun_callback_rebuilds_the_board(tmp_path):
    """A real Hydra multirun whose jobs write records; the callback builds the board once at the end."""
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent("""
        experiment: baseline
        seed: 0
        results_dir: results
        hydra:
          sweep: {dir: "${results_dir}/_sweep", subdir: "${hydra.job.num}"}
          job: {chdir: false}
          callbacks:
            leaderboard:
              _target_: noisebench.leaderboard.hydra_callback.LeaderboardCallback
              results_dir: ${results_dir}
              out_dir: boards
              n_boot: 200
        """))
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import hydra, numpy as np
        from noisebench.leaderboard.synthetic import arm_matrix, item_difficulty, make_record, write_run
        @hydra.main(version_base="1.3", config_path=".", config_name="cfg")
        def app(cfg):
            p = item_difficulty(200, np.random.default_rng(0))
            eff = -0.4 if cfg.experiment == "harsh" else 0.0
            noise = None if cfg.experiment == "baseline" else {"type": "relative_gaussian", "scale": 0.1,
                                                              "ops": ["linear"], "phases": ["all"]}
            y = arm_matrix(p, 1, eff, np.random.default_rng(cfg.seed + 10))[0]
            write_run(cfg.results_dir, make_record("tiny_arith", cfg.experiment, cfg.seed, y, noise=noise))
        app()
        """))
    res = subprocess.run([sys.executable, "app.py", "-m", "experiment=baseline,harsh", "seed=0,1"], cwd=tmp_path,
                         env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    md = (tmp_path / "boards" / "tiny_arith.md").read_text()
    assert "`harsh`" in md and "2 (0,1)" in md and "**degraded**" in md
    assert "--results results --out boards" in md  # remake command keeps the paths as configured


def test_wandb_table_logged_to_an_offline_run(results, tmp_path):
    wandb = pytest.importorskip("wandb")
    from noisebench.leaderboard.wandb_table import log_leaderboard_table

    exps, _ = tiny_frame(results[0])
    assert wandb.run is None and log_leaderboard_table(exps) is False  # no active run: no-op
    run = wandb.init(mode="offline", dir=str(tmp_path), project="noisebench-test", settings=wandb.Settings(
        silent=True, console="off"))
    try:
        assert log_leaderboard_table(exps, key="leaderboard/tiny_arith") is True
    finally:
        run.finish()
    tables = list(tmp_path.rglob("*.table.json"))
    assert len(tables) == 1
    data = json.loads(tables[0].read_text())
    assert len(data["data"]) == len(exps) and "verdict" in data["columns"]
    assert [r[data["columns"].index("verdict")] for r in data["data"]].count("**degraded**") == 2


def test_minimal_and_unfinished_records_do_not_break_the_board(tmp_path):
    from noisebench.record import write_record

    write_record(tmp_path / "r" / "a" / "record.json",
                 {"run_id": "a", "testbed": "tb", "experiment": "e4c", "seed": 0, "status": "failed"})
    write_record(tmp_path / "r" / "b" / "record.json",
                 {"run_id": "b", "testbed": "tb", "experiment": "baseline", "seed": 0, "status": "running"})
    paths = build_leaderboards(str(tmp_path / "r"), str(tmp_path / "o"), n_boot=200)
    md = (tmp_path / "o" / "tb.md").read_text()
    assert [p.name for p in paths] == ["tb.md"]
    assert "No finished runs yet." in md and "`e4c`" in md.split("## Not ranked")[1]


def test_records_are_written_atomically_and_readable_by_others(tmp_path):
    import os
    import stat

    from noisebench.record import read_record, write_record

    path = tmp_path / "r" / "record.json"
    write_record(path, {"run_id": "x", "testbed": "t", "experiment": "e", "seed": 0, "status": "ok",
                        "final": {"acc": float("nan")}})
    assert read_record(path)["final"]["acc"] is None  # NaN stored as null: valid JSON
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temp file left behind

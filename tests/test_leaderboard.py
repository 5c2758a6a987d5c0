"""The leaderboard end to end on synthetic records written with the real record schema (noisebench.leaderboard)."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from noisebench.leaderboard import build_leaderboards
from noisebench.leaderboard.cli import main as cli_main
from noisebench.leaderboard.reference import REFERENCE_DIR
from noisebench.leaderboard.synthetic import arm_matrix, item_difficulty, make_record, write_run
from noisebench.leaderboard.board import sections
from noisebench.leaderboard.table import runs_frame
from noisebench.record import load_records

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def rg(scale, **kw):
    return {"type": "relative_gaussian", "scale": scale, "ops": ["matmul_family"], "phases": ["all"], **kw}


MAIN = {"testbed": {"name": "tiny_arith", "n_test": 1000}, "trainer": {"max_steps": 100}, "eval": {"limit": None}}
SMOKE = {"testbed": {"name": "tiny_arith", "n_test": 1000}, "trainer": {"max_steps": 5}, "eval": {"limit": 50}}
OFF = np.array([0.0, 0.01, -0.01, 0.0, 0.01, -0.01])  # the seeds' spread: pooled seed SD 0.9 points


def vec(acc, n=1000):
    """A 0/1 vector with exactly round(acc * n) ones: run accuracies chosen to the item."""
    k = int(round(acc * n))
    return np.r_[np.ones(k), np.zeros(n - k)]


def arm(root, name, clean, noisy, noise=None, seeds=range(6), config=MAIN, **kw):
    """Write one arm's runs: clean / noisy final accuracies (mean + the seeds' spread, or None: not scored)."""
    for s in seeds:
        c = None if clean is None else vec(clean + OFF[s % 6])
        write_run(root, make_record("tiny_arith", name, s, vec(noisy + OFF[s % 6]), noise=noise, per_item_clean=c,
                                    config=config, steps=config["trainer"]["max_steps"], eval_every=5,
                                    wall_time_s=60.0 * (s + 1), **kw))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """tiny_arith: a 6-seed sweep with clean evaluation and known effects, a smoke run in another setting, diverged /
    failed / running runs; qwen2_5_1_5b_gsm8k: a single-seed pair; nobase: no baseline."""
    root = tmp_path_factory.mktemp("results")
    arm(root, "baseline", 0.50, 0.50)
    arm(root, "baseline_repeat", 0.50, 0.50, seeds=(7, 8))  # clean, same setting: pooled into the baseline
    arm(root, "e4b", 0.50, 0.50, rg(1e-4))  # no effect: equivalent
    arm(root, "e4c", 0.487, 0.487, rg(1e-3))  # -1.3 points: clean p < 0.05 alone, not after Holm (noisy: 0.048)
    arm(root, "deploy", 0.50, 0.40, rg(1e-2, phases=["eval"]))  # harms the noisy evaluation only
    arm(root, "harsh", 0.40, 0.35, rg(1e-1))
    for s in range(6):  # seed SD 10x the others': falls out of the pool
        write_run(root, make_record("tiny_arith", "wild", s, vec(0.5 + 10 * OFF[s]), noise=rg(3e-2),
                                    per_item_clean=vec(0.5 + 10 * OFF[s]), config=MAIN, steps=100))
    arm(root, "one", 0.45, 0.45, rg(2e-2), seeds=(0,))
    arm(root, "old", None, 0.49, rg(1e-3, ops=["linear"]))  # made without clean evaluation
    write_run(root, make_record("tiny_arith", "bitflip_exponent", 0, None, status="diverged", config=MAIN,
                                noise={"type": "bitflip", "scale": 1e-4, "ops": ["linear"], "phases": ["all"],
                                       "bits": "exponent"}))
    write_run(root, make_record("tiny_arith", "e5", 0, None, status="failed", noise=rg(1e-3), config=MAIN))
    write_run(root, make_record("tiny_arith", "e6", 1, None, status="running", noise=rg(1e-3), config=MAIN))
    arm(root, "smoke_e4c", 0.2, 0.2, rg(1e-3), seeds=(0,), config=SMOKE)  # a short run: its own setting
    rng = np.random.default_rng(0)
    q = item_difficulty(1319, rng)
    vecs = {}
    for name, noise in (("baseline", None), ("e4c", rg(1e-3))):
        vecs[name] = arm_matrix(q, 1, 0.0, rng)[0]
        write_run(root, make_record("qwen2_5_1_5b_gsm8k", name, 0, vecs[name], noise=noise))
    write_run(root, make_record("nobase", "e4c", 0, vec(0.5), noise=rg(1e-3)))
    return root, vecs


@pytest.fixture(scope="module")
def boards(results, tmp_path_factory):
    root, _ = results
    out = tmp_path_factory.mktemp("boards")
    paths = build_leaderboards(str(root), str(out), n_boot=1000)
    return out, paths


def tiny_sections(root):
    runs = runs_frame(load_records(root))
    return sections(runs[runs.testbed == "tiny_arith"].reset_index(drop=True), n_boot=1000)


def test_two_harms_verdicts_and_holm(results):
    secs = tiny_sections(results[0])
    main = secs[0]
    row = main.exps.set_index("experiment")
    base = row.loc["baseline"]
    assert base.n_seeds == 8 and "baseline_repeat" in base.note  # every clean run of the setting pooled
    assert row.loc["harsh", "d_clean"] == pytest.approx(-0.10) and row.loc["harsh", "d_noisy"] == pytest.approx(-0.15)
    assert row.loc["harsh", "verdict_clean"] == "degraded" == row.loc["harsh", "verdict_noisy"]
    assert row.loc["deploy", "verdict_clean"] == "equivalent" and row.loc["deploy", "verdict_noisy"] == "degraded"
    assert row.loc["e4b", "verdict_clean"] == "equivalent" == row.loc["e4b", "verdict_noisy"]
    e4c = row.loc["e4c"]  # significant alone, not after Holm, and said so on the row
    assert e4c.p_clean < 0.05 <= e4c.p_holm_clean and e4c.verdict_clean == "inconclusive"
    assert "after Holm" in e4c.note and e4c.d_clean_hi < 0  # its own 95% CI excludes 0
    assert row.loc["wild", "method_clean"] == "Welch" and "outlying" in row.loc["wild", "note"]
    assert row.loc["one", "verdict_clean"] == "too few seeds" and row.loc["one", "rank"] == "—"
    assert row.loc["old", "verdict_clean"] == "n/a" and math.isnan(row.loc["old", "d_clean"])
    assert row.loc["old", "verdict_noisy"] in ("equivalent", "inconclusive")
    assert row.loc["bitflip_exponent", "verdict_clean"] == "diverged"
    # Pooled: the baseline's 8 runs (7 df) and four 6-seed arms; `wild` left out, `one` and `old` add nothing.
    pool = main.pools["clean"]
    assert pool.df == 7 + 4 * 5 and list(pool.outlying) == [row.loc["wild", "group"]]
    s2 = (7 * np.var(np.r_[OFF, 0.01, -0.01], ddof=1) + 20 * np.var(OFF, ddof=1)) / 27
    assert pool.s2 == pytest.approx(s2, rel=1e-6)
    se = np.sqrt(s2 * (1 / 6 + 1 / 8))
    assert row.loc["e4b", "mde_clean"] == pytest.approx((sps.t.ppf(0.975, 27) + sps.t.ppf(0.8, 27)) * se)
    ranked = main.exps[main.exps["rank"] != "—"].experiment.tolist()
    assert ranked == ["baseline", "harsh"]  # numbers only where a row differs from the baseline
    assert {"e5", "e6"}.isdisjoint(main.exps.experiment)


def test_mismatched_setting_is_refused_with_its_reason(results):
    secs = tiny_sections(results[0])
    assert len(secs) == 2 and secs[0].main and not secs[1].main
    smoke = secs[1]
    assert not smoke.has_baseline
    assert "trainer.max_steps 100 vs 5" in smoke.diff and "eval.limit null vs 50" in smoke.diff
    r = smoke.exps.iloc[0]
    assert r.experiment == "smoke_e4c" and r.verdict_clean == "refused" and "trainer.max_steps 100 vs 5" in r.note
    assert math.isnan(r.d_clean)  # never compared with the sweep's baseline
    assert "smoke_e4c" not in set(secs[0].exps.experiment)  # nor pooled into the sweep


def test_markdown_sections(boards):
    out, paths = boards
    md = (out / "tiny_arith.md").read_text()
    assert "noisebench-leaderboard --results" in md and "## Legend" in md
    ranking = md.split("## Ranking")[1].split("## Harm thresholds")[0]
    assert "MDE (pts)" in ranking and "pooled seed SD" in ranking and "margin ±2 points" in ranking
    assert "**degraded**" in ranking and "**diverged**" in ranking and "`e5`" not in ranking
    assert "too few seeds" in ranking and "equivalent" in ranking and "| n/a " in ranking
    other = md.split("## Other training setting")[1].split("## ")[0]
    assert "`smoke_e4c`" in other and "refused" in other and "trainer.max_steps 100 vs 5" in other
    unranked = md.split("## Not ranked")[1].split("## Reference")[0]
    assert "`e5`" in unranked and "failed" in unranked and "running" in unranked
    th = md.split("## Harm thresholds")[1].split("## ")[0]
    assert "1e-01 (60× bf16, Δ -10.0" in th  # harsh: the smallest degraded scale, with its CI
    assert "| 0.6×" in ranking  # e4c's 1e-3 in bf16-rounding units
    assert "tiny_arith_curves.png" in md and "tiny_arith_tolerance.png" in md
    nobase = (out / "nobase.md").read_text()
    assert "refused" in nobase and "**degraded**" not in nobase
    assert {p.name for p in paths} >= {"tiny_arith.md", "tiny_arith_curves.png", "tiny_arith_tolerance.png",
                                       "qwen2_5_1_5b_gsm8k.md", "nobase.md"}


def test_single_seed_pair_gets_items_only_ci_and_no_verdict(results, boards):
    root, vecs = results
    runs = runs_frame(load_records(root))
    secs = sections(runs[runs.testbed == "qwen2_5_1_5b_gsm8k"].reset_index(drop=True), n_boot=1000)
    row = secs[0].exps.set_index("experiment").loc["e4c"]
    d = vecs["e4c"].mean() - vecs["baseline"].mean()
    assert row.method_noisy == "items only" and row.d_noisy_lo < d < row.d_noisy_hi
    assert row.verdict_noisy == "too few seeds" and "items only" in row.note


def test_committed_boards_regenerate_from_their_records(tmp_path, monkeypatch):
    """leaderboards/<testbed>.md is exactly what the board makes of leaderboards/records."""
    monkeypatch.chdir(ROOT)
    build_leaderboards("leaderboards/records", str(tmp_path), n_boot=2000, log_wandb=False)
    for name in ("tiny_arith", "tiny_sharpen"):
        made = (tmp_path / f"{name}.md").read_text().replace(f"--out {tmp_path}`", "--out leaderboards`")
        assert made == (ROOT / "leaderboards" / f"{name}.md").read_text()
    assert "| n/a " in (tmp_path / "tiny_arith.md").read_text()  # old records: no clean evaluation


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
    assert {m.split(".")[1] for m in mods if m.count(".") >= 1} <= {"leaderboard", "record", "resources"}


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

    exps = tiny_sections(results[0])[0].exps
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
    assert len(data["data"]) == len(exps) and "training verdict" in data["columns"]
    assert [r[data["columns"].index("training verdict")] for r in data["data"]].count("**degraded**") == 1
    assert [r[data["columns"].index("deployment verdict")] for r in data["data"]].count("**degraded**") == 3
    clean = [r[data["columns"].index("delta_clean_pts")] for r in data["data"]]
    assert min(d for d in clean if isinstance(d, float) and math.isfinite(d)) == pytest.approx(-10.0)


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

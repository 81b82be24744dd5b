"""sweep.py end to end: a reduced --quick sweep with the tiny model, then resume."""
import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --quick, reduced: one alpha besides iterative DPO, two iterations, the tiny model, small data
TINY = ["--quick", "--alphas", "0.01", "--model", "tiny", "--n-sft", "256", "--chunk-size", "32",
        "--n-eval", "32", "--sft-steps", "30", "--iterations", "2", "--k", "4", "--diag-prompts", "16"]


def sweep(out, *extra):
    p = subprocess.run([sys.executable, "-m", "experiments.sweep", *TINY, "--out", str(out), *extra],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_quick_sweep_tables_and_resume(tmp_path):
    out = sweep(tmp_path)
    seed = tmp_path / "len7-10" / "seed0"
    assert sorted(os.listdir(seed)) == ["dpo", "idpo", "selm_a0.01"]
    assert out.count("] len7-10/seed0/") == 3  # one progress line per finished run
    report = (tmp_path / "report.md").read_text()
    for row in ["| SFT |", "| offline DPO |", "| iterative DPO, iter 1 |", "| iterative DPO, iter 2 |",
                "| SELM α=0.01, iter 1 |", "| SELM α=0.01, iter 2 |"]:
        assert report.count(row) == 2, row  # once in Table 1, once in the diagnostics
    assert "Head-to-head" in report and "| 0.01 |" in report
    summary = json.load(open(tmp_path / "report.json"))["len7-10"]
    assert len(summary["head_to_head"]["selm_a0.01/selm_2"]) == 1
    h2h = summary["head_to_head"]["selm_a0.01/selm_2"][0]
    assert 0.0 <= h2h <= 1.0
    diag = summary["diagnostics"]["SELM α=0.01, iter 1"]
    assert 1 <= diag["distinct"][0] <= 4 and diag["r_chosen"][0] is not None
    ana = json.load(open(seed / "idpo" / "analysis.json"))
    assert sorted(ana) == ["selm_1", "selm_2"] and len(ana["selm_1"]["answers"]) == 32

    # a second invocation redoes nothing
    mtimes = {p: os.path.getmtime(p) for p in seed.glob("*/*.pt")}
    again = sweep(tmp_path)
    assert again.count("skipped len7-10/seed0/") == 3 and "FAILED" not in again
    assert mtimes == {p: os.path.getmtime(p) for p in seed.glob("*/*.pt")}

    # an interrupted run (last stage lost) continues with --resume; the others are skipped
    run = seed / "idpo"
    (run / "selm_2.pt").unlink()
    rows = json.load(open(run / "results.json"))
    json.dump(rows[:-1], open(run / "results.json", "w"))
    ana.pop("selm_2")
    json.dump(ana, open(run / "analysis.json", "w"))
    third = sweep(tmp_path)
    assert third.count("skipped len7-10/seed0/") == 2 and "] len7-10/seed0/idpo " in third
    assert "--resume" in [line for line in (run / "sweep.log").read_text().splitlines() if line.startswith("$ ")][-1]
    assert mtimes[run / "selm_1.pt"] == os.path.getmtime(run / "selm_1.pt")
    assert [r["stage"] for r in json.load(open(run / "results.json"))] == ["sft", "dpo", "selm_1", "selm_2"]


def test_bad_difficulty_is_an_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.sweep", "--difficulties", "hard",
                        "--out", str(tmp_path), "--report-only"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "len<min>-<max>" in p.stderr


@pytest.mark.parametrize("argv,msg", [(["--seeds", "x"], "--seeds must be comma-separated integers"),
                                      (["--difficulties", "len5"], "len<min>-<max>"),
                                      (["--alphas", "-1"], "--alphas must be comma-separated numbers >= 0"),
                                      (["--quick", "--report-only", "--out", "/nonexistent/sweep"], "no finished run")])
def test_bad_flags_are_one_line_errors(argv, msg, capsys):
    from experiments import sweep
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert msg in str(e.value) and str(e.value).startswith("python -m experiments.sweep: error: "), str(e.value)


def test_implicit_rewards_of_a_sampled_y_ref_run(tmp_path):
    """The analysis relabels a sampled, two-answer iteration exactly as train.py did (the same
    answers, pairs and ties as the stage logged) and reports its implicit rewards."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = [sys.executable, "train.py", "--model", "tiny", "--n-sft", "256", "--chunk-size", "32", "--n-eval", "16",
             "--sft-steps", "30", "--iterations", "1", "--y-ref", "sampled", "--online-samples", "2",
             "--out-dir", str(tmp_path)]
    for cmd in (train, [sys.executable, "-m", "experiments.analyse", str(tmp_path), "--k", "2", "--diag-prompts", "32"]):
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ana = json.load(open(tmp_path / "analysis.json"))
    assert list(ana) == ["selm_1"]  # a run with iterations leaves SFT and offline DPO to its base run
    assert isinstance(ana["selm_1"]["r_chosen"], float) and isinstance(ana["selm_1"]["r_samples"], float)

    from experiments import analyse
    from runtime import read_metrics
    online = next(r["online"] for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("stage") == "selm_1" and "online" in r)
    run = analyse.load_run(str(tmp_path))
    got = analyse.trained_pairs(run, analyse.load_model(str(tmp_path), "dpo"), 1, 32)  # the whole chunk
    offline = [run.tok.encode_response(e["chosen"]) for e in run.task.chunks[1]]
    assert [len(a) for a in got.answers] == [2] * 32
    assert sum(y[-1] not in run.tok.eos_ids for a in got.answers for y in a) == online["y_ref_truncated"]
    assert sum(p is None for p in got.pairs) == online["dropped_ties"]
    assert sum(p is not None and p[0] != w for p, w in zip(got.pairs, offline)) == \
        round(online["y_ref_chosen"] * online["pairs"])

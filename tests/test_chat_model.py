"""experiments/chat_model.py's decision machinery (the preregistered rules of
docs/instructions-plan.md), without running the comparison."""

import math
import os

from experiments import chat_model as cm


def test_interval_is_the_t_interval_with_two_degrees_of_freedom():
    m, lo, hi = cm.interval([0.10, 0.05, 0.15])
    assert math.isclose(m, 0.10) and math.isclose(hi - m, 4.303 * 0.05 / math.sqrt(3))


def test_decide():
    assert cm.decide(0.01, 0.2) == "helps"
    assert cm.decide(-0.2, -0.01) == "hurts"
    assert cm.decide(-0.03, 0.02) == "equivalent"  # within the margin of 0.03
    assert cm.decide(-0.04, 0.02) == "inconclusive"
    assert cm.decide(-0.2, 0.1) == "inconclusive"


def test_sign_test_is_mcnemars_exact_test():
    assert cm.sign_test(0, 0) == 1.0
    assert math.isclose(cm.sign_test(5, 0), 2 / 32)  # all five discordant pairs one way
    assert math.isclose(cm.sign_test(3, 3), 1.0)
    assert math.isclose(cm.sign_test(1, 9), 2 * 11 / 1024)


def test_every_phase_hands_the_runner_each_arms_base(tmp_path, monkeypatch):
    """The runner starts a run only once its base is trained and runs only the jobs it is
    given: a phase that left out a base it had not trained yet would wait forever."""
    launched = []
    monkeypatch.setattr(cm, "make_pairs", lambda args, P, task_seed: "pairs.jsonl")
    monkeypatch.setattr(cm, "launch", lambda args, P, jobs, pairs: launched.append(list(jobs)))
    monkeypatch.setattr(cm.Run, "final", lambda job, key="reward": 0.5)
    monkeypatch.setattr(cm, "write_json_atomic", lambda obj, path: None)
    args = cm.parser().parse_args(["--init-from", str(tmp_path), "--out", str(tmp_path / "out")])
    decisions = {}
    cm.tune(args, cm.FULL, decisions, str(tmp_path / "decisions.json"))
    cm.held_out(args, cm.FULL, decisions)
    assert len(launched) == 3  # the lr grid, the alpha grid, the held-out runs
    seen = set()  # a base launched by an earlier phase is trained by the time a later one starts
    for jobs in launched:
        seen |= {j.name for j in jobs}
        for j in jobs:
            assert j.base is None or j.base.name in seen, (j.name, j.base.name)
    assert len(launched[2]) == len(cm.FULL["heldout"]) * (1 + len(cm.ARMS))


def test_answer_tables_count_degenerate_answers_and_constraints_met(tmp_path):
    """Three prompts, one seed: the starting model loops on the first, writes a stub to the
    second and copies the example title on the third; an arm's last stage meets the first,
    says nothing to the second and restates the third. Every reason of tasks.instructions.DEGENERATE
    has its row."""
    import json
    from types import SimpleNamespace

    from constraints import Constraint
    from tasks.instructions import DEGENERATE, make_prompt
    p1 = make_prompt("a short poem", "the ocean", [Constraint("lowercase", ())])
    p2 = make_prompt("a short poem", "the ocean", [Constraint("no_commas", ())])
    p3 = make_prompt("a short poem", "the ocean", [Constraint("title", ())])
    loop = "The ocean waves. " * 8
    start = [loop, "the ocean is wide", "<<a title>>\nThe ocean rolls in under a grey sky and gulls cry over the pier"]
    said = {("base", "sft"): start, ("base", "dpo"): start}
    said.update({(a, "selm_1"): ["the ocean is calm and deep tonight under a pale and silent moon", "",
                                 "A short poem about the ocean."] for a in cm.ARMS})
    jobs = {}
    for name in ["base", *cm.ARMS]:  # the arms evaluate their own stages; the shared ones are the base's
        d = tmp_path / name
        d.mkdir()
        rows = [{"eval": {"stage": st}, "answers": ans} for (a, st), ans in said.items() if a == name]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        jobs[name] = SimpleNamespace(dir=str(d), base=None if name == "base" else jobs["base"])
    runs = {0: {arm: jobs[arm] for arm in cm.ARMS}}
    lines = cm.answer_tables(runs, [0], 1, [p1, p2, p3])
    row = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in lines if line.startswith("| ")}
    assert {f"{why} (scores 0)" for why in DEGENERATE} <= set(row)
    assert row["repetitive (scores 0)"][:3] == ["1", "1", "0"]
    assert row["stub (scores 0)"][:3] == ["1", "1", "0"]  # "the ocean is wide": 4 words, a poem needs 10
    assert row["placeholder title (scores 0)"][:3] == ["1", "1", "0"]
    assert row["empty (scores 0)"][:3] == ["0", "0", "1"]
    assert row["restates the request (scores 0)"][:3] == ["0", "0", "1"]
    assert row["off topic (scores 0)"][:3] == ["0", "0", "0"]
    assert row["answers of under 12 words"][:3] == ["1", "1", "1"]  # "the ocean is wide"; the restated request
    assert row["lowercase"] == ["1", "0.00", "0.00", "1.00", "1.00", "1.00 |"]
    assert row["no_commas"] == ["1", "0.00", "0.00", "0.00", "0.00", "0.00 |"]  # a stub, then nothing


def test_cut_share_reads_the_iterations_online_record(tmp_path):
    import json
    from types import SimpleNamespace
    online = {"pairs": 30, "dropped_ties": 2, "y_ref_truncated": 8}
    rows = [{"stage": "selm_1", "online": {**online, "y_ref_truncated": 16}}, {"eval": {"stage": "selm_1"}},
            {"stage": "selm_2", "online": online}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = SimpleNamespace(dir=str(tmp_path))
    assert (cm.cut_share(job, 1), cm.cut_share(job, 2)) == (0.5, 0.25)  # of the 32 prompts each


def test_before_after_gives_each_answer_the_judges_verdict(tmp_path):
    import json
    from types import SimpleNamespace

    from constraints import Constraint
    from tasks.instructions import make_prompt
    p = make_prompt("a short poem", "the ocean", [Constraint("lowercase", ()), Constraint("no_commas", ())])
    good, loop = "the ocean is calm and deep tonight under a pale and silent moon", "The ocean waves. " * 8
    rows = [{"eval": {"stage": "sft"}, "answers": [loop]}, {"eval": {"stage": "selm_1"}, "answers": [good]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = cm.before_after(SimpleNamespace(dir=str(tmp_path), base=None), 1, [p], n=5)
    assert f"| before | `{loop.strip()}` | 0: repetitive |" in lines
    assert f"| after | `{good}` | lowercase yes, no_commas yes |" in lines


def test_the_free_requests_are_judged_by_the_checkers_they_name():
    """The three requests written freely: a plain answer that meets them passes every checker,
    one that breaks them fails, and a loop scores 0 for that."""
    from experiments.chat_model import FREE, free_verdict
    cat, note, plants = (request for _, request in FREE)
    assert free_verdict(cat, "my cat sleeps in the sun, a warm gold puddle of fur, dreaming slow dreams "
                             "until the light moves on") == "lowercase yes"
    assert free_verdict(cat, "My Cat sleeps in the sun, a warm gold puddle of fur, dreaming slow dreams "
                             "until the light moves on") == "lowercase no"
    assert free_verdict(note, "I am sorry about the noise last night. The party ran later than I meant it to. "
                              "It will not happen again.") == "at_most_sentences yes, no_commas yes"
    assert free_verdict(plants, "* Water your houseplants only when the soil is dry.\n* Give them bright "
                                "indirect light.\n* Wipe the dust off their leaves.") == "bullets yes"
    assert free_verdict(plants, "plants " * 20).startswith("0: repetitive")


def test_report_decides_each_comparison_from_the_runs(tmp_path, monkeypatch):
    """Three seeds whose last-stage accuracies are set by hand: iterative DPO ends 0.04-0.06
    above offline DPO (an interval above 0: helps), SELM within 0.01 of it (inside the 0.03
    margin: equivalent). The pooled counts come from the answers: on each seed arm A meets one
    prompt that arm O misses."""
    import json
    from types import SimpleNamespace

    from constraints import Constraint
    from tasks.instructions import make_prompt
    prompt = make_prompt("a short poem", "the ocean", [Constraint("lowercase", ())])
    good = "the ocean is calm and deep tonight under a pale and silent moon"
    monkeypatch.setattr(cm, "make_task", lambda **kw: SimpleNamespace(eval=[prompt] * 4))
    monkeypatch.setattr(cm, "free_prompts", lambda job, T: [])  # it loads the real model
    last = {"O": [0.20, 0.22, 0.18], "A": [0.25, 0.28, 0.22], "B": [0.25, 0.29, 0.21]}
    met = {"O": 1, "A": 2, "B": 2}  # prompts met at the last stage, of 4
    P = dict(cm.FULL, heldout=[0, 1, 2], T=2)
    args = SimpleNamespace(out=str(tmp_path))
    decisions = {"lr_grid": {"1e-05": 0.3}, "lr": 1e-5, "alpha_grid": {"0.03": 0.3}, "alpha_A": 0.3, "alpha": 0.03}
    runs = {}
    for s in P["heldout"]:
        base = cm.Run(str(tmp_path), f"seed{s}/base", ["--task", "instructions", "--n-eval", "4"], 0)
        runs[s] = {a: cm.arm_job(args, P, base, a, 0.03) for a in cm.ARMS}
        for a, job in runs[s].items():
            os.makedirs(job.dir)
            acc = {"sft": 0.1, "dpo": 0.15, "selm_1": last[a][s] - 0.01, "selm_2": last[a][s]}
            rows = [{"stage": st, **{k: 0.5 for k in ["instruction_accuracy", "reward", "win_rate_vs_sft", "kl",
                                                      "length"]}, "prompt_accuracy": v} for st, v in acc.items()]
            with open(os.path.join(job.dir, "results.json"), "w") as f:
                json.dump(rows, f)
            said = [{"eval": {"stage": st}, "answers": ([good] * (met[a] if st == "selm_2" else 1) + [""] * 4)[:4]}
                    for st in acc]
            online = [{"stage": f"selm_{t}", "online": {"pairs": 8, "dropped_ties": 2, "y_ref_truncated": t + s}}
                      for t in (1, 2) if a != "O"]
            with open(os.path.join(job.dir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in said + online)
    cm.report(args, P, decisions, runs)
    got = json.load(open(tmp_path / "report.json"))
    a_o, b_a = got["comparisons"]["A - O"], got["comparisons"]["B - A"]
    assert a_o["decision"] == "helps" and math.isclose(a_o["mean"], 0.05)
    assert a_o["interval"][0] > 0 and a_o["pooled"] == [3, 0] and math.isclose(a_o["p"], 0.25)
    assert b_a["decision"] == "equivalent" and abs(b_a["mean"]) < 1e-9 and b_a["pooled"] == [0, 0]
    assert got["y_ref_cut"]["A"] == [[0.1, 0.2, 0.3], [0.2, 0.3, 0.4]]  # (t + seed) of 10 prompts
    assert "O" not in got["y_ref_cut"]  # arm O samples nothing
    assert got["recipe"] == [[0.1, 0.25], [0.1, 0.29], [0.1, 0.21]]
    report = (tmp_path / "report.md").read_text()
    assert "| A - O | +0.050 |" in report and "| helps |" in report

"""experiments.recipe_sizes: a cell's phases read from its metrics.jsonl, and the full recipe's
time predicted from them, checked on a hand-made log whose arithmetic is done here by hand."""
import json

from experiments import recipe_sizes


def test_phases_and_the_predicted_recipe(tmp_path):
    online = {"pairs": 30, "dropped_ties": 2, "y_ref_truncated": 8, "t_sample": 10.0, "t_judge": 1.0,
              "t_ref_logps": 3.0, "t_train": 20.0}
    rows = [{"offline_pairs": {"pairs": [40, 30], "unfinished_chosen": 5, "unfinished_rejected": 7}},
            {"eval": {"stage": "sft"}, "time": 12.0, "answers": ["a"] * 16},
            {"stage": "dpo", "step": 0, "loss": 0.69},
            {"eval": {"stage": "dpo"}, "time": 40.0, "answers": ["a"] * 16},
            {"stage": "selm_1", "online": online},
            {"eval": {"stage": "selm_1"}, "time": 50.0, "online": online, "answers": ["a"] * 16}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = recipe_sizes.phases(str(tmp_path), wall=200.0)
    # the iteration: 10 + 1 + 3 + 20 = 34 s; a trained stage's evaluation: 50 - 34 = 16 s; offline DPO's
    # training: 40 - 16 = 24 s; loading and pairs: 200 - (12 + 40 + 50) = 98 s
    assert (p["iteration"], p["eval_trained"], p["dpo_train"], p["start_and_pairs"]) == (34, 16, 24, 98)
    assert (p["pairs"], p["offline_unfinished"], p["y_ref_cut"], p["online_prompts"]) == ([40, 30], 12, 8, 32)
    # T = 2, 64 held out (4x the cell's 16): pairs of 3 chunks 98 * 3 / 2, evaluations 12 * 4 + 16 * 4 * 3,
    # offline DPO 24, iterations 34 * 2
    assert recipe_sizes.predicted(p, 2, 64) == 98 * 1.5 + 48 + 192 + 24 + 68
    assert "| 40, 30 | 12 of 140 | 8 of 32 |" in recipe_sizes.table([((64, 128), p)], 2, 64)[2]

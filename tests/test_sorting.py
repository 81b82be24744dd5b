"""Tests for tasks/sorting.py: the sorting task, its reward and judge."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tasks import sorting  # noqa: E402


@pytest.fixture(scope="module")
def task():
    return sorting.make_task(seed=0, n_sft=2000, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)


# ---------------------------------------------------------------- reward and judge

def test_reward_values():
    assert sorting.reward("abcd", "abcd") == 1.0
    assert sorting.reward("abcd", "") == 0.0
    assert sorting.reward("sort: dbca\n", "abcd") == 1.0  # truth derived from the prompt
    assert sorting.reward("abcd", "abdc") == 0.5           # 2 of 4 positions
    assert sorting.reward("abcd", "abcdxx") == 4 / 6       # too long: divided by 6
    assert sorting.reward("abcd", "ab") == 2 / 4           # too short: divided by 4
    assert sorting.reward("abcd", "abcd\n") == 4 / 5       # no stripping
    assert sorting.reward("aabc", "abac") == 2 / 4
    assert sorting.reward("abcd", "abcdx") < 1.0


def test_judge_ranks_and_needs_no_hidden_state():
    p = sorting.make_prompt("dcbaex")
    cands = ["abcdex", sorting.bubble_passes("dcbaex", 2), "dcbaex", ""]
    scores = sorting.judge(p, cands)
    assert len(scores) == 4 and scores[0] == 1.0
    assert scores[0] > scores[1] > scores[2] > scores[3] == 0.0
    with pytest.raises(ValueError):
        sorting.judge("please sort dcba", ["abcd"])


def test_bubble_passes():
    assert sorting.bubble_passes("dcba", 0) == "dcba"
    assert sorting.bubble_passes("dcba", 1) == "cbad"   # largest letter floats to the end
    assert sorting.bubble_passes("dcba", 2) == "bacd"
    assert sorting.bubble_passes("dcba", 3) == "abcd"
    assert sorting.bubble_passes("dcba", 9) == "abcd"
    assert sorting.truth("sort: dcba\n") == "abcd"
    ex = sorting.examples("language")
    assert ex[0]["response"] == "language" and ex[-1]["reward"] == 1.0


# ---------------------------------------------------------------- task

def test_task_is_deterministic(task):
    again = sorting.make_task(seed=0, n_sft=2000, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)
    assert (again.sft, again.chunks, again.eval) == (task.sft, task.chunks, task.eval)
    other = sorting.make_task(seed=1, n_sft=2000, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)
    assert other.sft != task.sft and other.chunks != task.chunks and other.eval != task.eval


def test_eval_size_does_not_change_training_data(task):
    small = sorting.make_task(seed=0, n_sft=2000, n_prompts_per_chunk=300, n_chunks=3, n_eval=10)
    assert small.sft == task.sft and small.chunks == task.chunks
    assert small.eval == task.eval[:10]
    fewer_sft = sorting.make_task(seed=0, n_sft=7, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)
    assert fewer_sft.chunks == task.chunks and fewer_sft.eval == task.eval
    assert fewer_sft.sft == task.sft[:7]


def test_shapes_lengths_and_format(task):
    assert len(task.sft) == 2000 and len(task.eval) == 300
    assert [len(c) for c in task.chunks] == [300, 300, 300]
    for p, r in task.sft:
        w = sorting.parse_prompt(p)
        assert 7 <= len(w) <= 10 and sorted(r) == sorted(w)
    chunk_prompts = [e["prompt"] for c in task.chunks for e in c]
    assert len(set(chunk_prompts)) == len(chunk_prompts)  # chunks are disjoint


def test_eval_prompts_disjoint_from_training(task):
    train = {p for p, _ in task.sft} | {e["prompt"] for c in task.chunks for e in c}
    evals = [e["prompt"] for e in task.eval]
    assert len(set(evals)) == len(evals)
    assert not train & set(evals)
    # by construction: a fixed hash puts every word on one side
    assert all(sorting.is_eval_word(sorting.parse_prompt(p)) for p in evals)
    assert not any(sorting.is_eval_word(sorting.parse_prompt(p)) for p in train)
    # also across seeds: the split is by word, not by draw
    other = sorting.make_task(seed=5, n_sft=500, n_prompts_per_chunk=100, n_chunks=2, n_eval=0)
    assert not ({p for p, _ in other.sft} & set(evals))


def test_sft_demos_are_mediocre(task):
    rs = [sorting.reward(p, r) for p, r in task.sft]
    mean, perfect = sum(rs) / len(rs), sum(r == 1.0 for r in rs) / len(rs)
    assert 0.35 < mean < 0.6, mean
    assert perfect < 0.12, perfect


def test_offline_pairs_strictly_ordered(task):
    for c in task.chunks:
        for e in c:
            assert set(e) == {"prompt", "chosen", "rejected"}
            assert sorting.reward(e["prompt"], e["chosen"]) > sorting.reward(e["prompt"], e["rejected"])


def test_eval_references_in_band(task):
    rs = [sorting.reward(e["prompt"], e["reference"]) for e in task.eval]
    mean, perfect = sum(rs) / len(rs), sum(r == 1.0 for r in rs) / len(rs)
    assert 0.55 < mean < 0.75, mean
    assert perfect < 0.3, perfect
    sft_mean = sum(sorting.reward(p, r) for p, r in task.sft) / len(task.sft)
    assert mean > sft_mean + 0.1

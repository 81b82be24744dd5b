"""Tests for data.py: tokenizer, task, JSONL, judges, batching. Run: pytest -q tests/test_data.py"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import DataError  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return data.get_tokenizer(verbose=False)


@pytest.fixture(scope="module")
def task():
    return data.make_task(seed=0, n_sft=2000, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)


def byte_tok():
    # force the byte-level tokenizer whatever is cached on this machine
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        return data.get_tokenizer(verbose=False)
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


# ---------------------------------------------------------------- tokenizer

def test_byte_tokenizer_round_trip_and_specials():
    t = byte_tok()
    assert (t.name, t.eos_id, t.pad_id, t.vocab_size) == ("bytes", 256, 257, 258)
    text = "sort: dbca\nhéllo 日本 🙂"
    ids = t.encode(text)
    assert ids == list(text.encode("utf-8"))  # one id per byte
    assert t.decode(ids) == text
    # special-token text inside user data stays plain text, never the EOS id
    assert 256 not in t.encode("a<|endoftext|>b")
    assert t.decode([97, 256]) == "a<|endoftext|>"
    # half a UTF-8 character decodes with a replacement char instead of raising
    assert t.decode(list("日".encode())[:2]) == "\ufffd"
    assert t.decode(torch.tensor([104, 105])) == "hi"


def test_no_download_when_cache_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(data.tiktoken, "get_encoding",
                        lambda name: pytest.fail("get_encoding would try to download"))
    assert data.get_tokenizer(verbose=False).name == "bytes"


def test_corrupt_cached_gpt2_files_are_not_used(tmp_path, monkeypatch):
    import hashlib
    for url in data._GPT2_FILES:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_text("truncated download")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(data.tiktoken, "get_encoding",
                        lambda name: pytest.fail("tiktoken would delete and re-download"))
    assert data.get_tokenizer(verbose=False).name == "bytes"


def test_gpt2_from_dir_plumbing(tmp_path, monkeypatch):
    # No real GPT-2 files offline: stand in a fake 50256-entry rank table and check that
    # the files are found, tiktoken's cache is off during the read, and the ids are GPT-2's.
    import tiktoken.load
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "vocab.json").write_text("{}")
    seen = {}

    def fake_ranks(merges, vocab):
        seen["files"] = (os.path.basename(merges), os.path.basename(vocab))
        seen["cache"] = os.environ.get("TIKTOKEN_CACHE_DIR")
        ranks = {bytes([i]): i for i in range(256)}
        ranks.update({f"<fake{i}>".encode(): i for i in range(256, 50256)})
        return ranks
    monkeypatch.setattr(tiktoken.load, "data_gym_to_mergeable_bpe_ranks", fake_ranks)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/somewhere")
    t = data.get_tokenizer(bpe_path=str(tmp_path), verbose=False)
    assert seen == {"files": ("merges.txt", "vocab.json"), "cache": ""}
    assert os.environ["TIKTOKEN_CACHE_DIR"] == "/somewhere"
    assert (t.name, t.eos_id, t.pad_id, t.vocab_size) == ("gpt2", 50256, 50256, 50257)
    assert t.decode(t.encode("héllo")) == "héllo"


def test_explicit_bpe_path_without_files_is_an_error(tmp_path):
    with pytest.raises(DataError, match="vocab.bpe"):
        data.get_tokenizer(bpe_path=str(tmp_path), verbose=False)


# ---------------------------------------------------------------- reward and judge

def test_reward_values():
    assert data.reward("abcd", "abcd") == 1.0
    assert data.reward("abcd", "") == 0.0
    assert data.reward("sort: dbca\n", "abcd") == 1.0  # truth derived from the prompt
    assert data.reward("abcd", "abdc") == 0.5           # 2 of 4 positions
    assert data.reward("abcd", "abcdxx") == 4 / 6       # too long: divided by 6
    assert data.reward("abcd", "ab") == 2 / 4           # too short: divided by 4
    assert data.reward("abcd", "abcd\n") == 4 / 5       # no stripping
    assert data.reward("aabc", "abac") == 2 / 4
    assert data.reward("abcd", "abcdx") < 1.0


def test_judge_ranks_and_needs_no_hidden_state():
    p = data.make_prompt("dcbaex")
    cands = ["abcdex", data.bubble_passes("dcbaex", 2), "dcbaex", ""]
    scores = data.judge(p, cands)
    assert len(scores) == 4 and scores[0] == 1.0
    assert scores[0] > scores[1] > scores[2] > scores[3] == 0.0
    with pytest.raises(DataError):
        data.judge("please sort dcba", ["abcd"])


def test_bubble_passes():
    assert data.bubble_passes("dcba", 0) == "dcba"
    assert data.bubble_passes("dcba", 1) == "cbad"   # largest letter floats to the end
    assert data.bubble_passes("dcba", 2) == "bacd"
    assert data.bubble_passes("dcba", 3) == "abcd"
    assert data.bubble_passes("dcba", 9) == "abcd"
    assert data.truth("sort: dcba\n") == "abcd"
    ex = data.examples("language")
    assert ex[0]["response"] == "language" and ex[-1]["reward"] == 1.0


# ---------------------------------------------------------------- task

def test_task_is_deterministic(task):
    again = data.make_task(seed=0, n_sft=2000, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)
    assert (again.sft, again.chunks, again.eval) == (task.sft, task.chunks, task.eval)
    other = data.make_task(seed=1, n_sft=2000, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)
    assert other.sft != task.sft and other.chunks != task.chunks and other.eval != task.eval


def test_eval_size_does_not_change_training_data(task):
    small = data.make_task(seed=0, n_sft=2000, n_prompts_per_chunk=300, n_chunks=3, n_eval=10)
    assert small.sft == task.sft and small.chunks == task.chunks
    assert small.eval == task.eval[:10]
    fewer_sft = data.make_task(seed=0, n_sft=7, n_prompts_per_chunk=300, n_chunks=3, n_eval=300)
    assert fewer_sft.chunks == task.chunks and fewer_sft.eval == task.eval
    assert fewer_sft.sft == task.sft[:7]


def test_shapes_lengths_and_format(task):
    assert len(task.sft) == 2000 and len(task.eval) == 300
    assert [len(c) for c in task.chunks] == [300, 300, 300]
    for p, r in task.sft:
        w = data.parse_prompt(p)
        assert 7 <= len(w) <= 10 and sorted(r) == sorted(w)
    chunk_prompts = [e["prompt"] for c in task.chunks for e in c]
    assert len(set(chunk_prompts)) == len(chunk_prompts)  # chunks are disjoint


def test_eval_prompts_disjoint_from_training(task):
    train = {p for p, _ in task.sft} | {e["prompt"] for c in task.chunks for e in c}
    evals = [e["prompt"] for e in task.eval]
    assert len(set(evals)) == len(evals)
    assert not train & set(evals)
    # by construction: a fixed hash puts every word on one side
    assert all(data.is_eval_word(data.parse_prompt(p)) for p in evals)
    assert not any(data.is_eval_word(data.parse_prompt(p)) for p in train)
    # also across seeds: the split is by word, not by draw
    other = data.make_task(seed=5, n_sft=500, n_prompts_per_chunk=100, n_chunks=2, n_eval=0)
    assert not ({p for p, _ in other.sft} & set(evals))


def test_sft_demos_are_mediocre(task):
    rs = [data.reward(p, r) for p, r in task.sft]
    mean, perfect = sum(rs) / len(rs), sum(r == 1.0 for r in rs) / len(rs)
    assert 0.35 < mean < 0.6, mean
    assert perfect < 0.12, perfect


def test_offline_pairs_strictly_ordered(task):
    for c in task.chunks:
        for e in c:
            assert set(e) == {"prompt", "chosen", "rejected"}
            assert data.reward(e["prompt"], e["chosen"]) > data.reward(e["prompt"], e["rejected"])


def test_eval_references_in_band(task):
    rs = [data.reward(e["prompt"], e["reference"]) for e in task.eval]
    mean, perfect = sum(rs) / len(rs), sum(r == 1.0 for r in rs) / len(rs)
    assert 0.55 < mean < 0.75, mean
    assert perfect < 0.3, perfect
    sft_mean = sum(data.reward(p, r) for p, r in task.sft) / len(task.sft)
    assert mean > sft_mean + 0.1


# ---------------------------------------------------------------- JSONL and judges

def write(tmp_path, text, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_load_jsonl_good(tmp_path):
    path = write(tmp_path, '{"prompt": "p1", "chosen": "a", "rejected": "b", "x": 1}\n\n'
                           '{"prompt": "p2", "chosen": "c", "rejected": "d"}\n')
    rows = data.load_jsonl(path, ("prompt", "chosen", "rejected"))
    assert [r["prompt"] for r in rows] == ["p1", "p2"] and rows[0]["x"] == 1


GOOD = '{"prompt": "p", "completion": "c"}\n'


@pytest.mark.parametrize("text, line, what", [
    ("", 1, "empty"),
    ("\n  \n", 1, "empty"),
    (GOOD + '{"prompt": "p", "completion": }\n', 2, "bad JSON"),
    (GOOD + GOOD + '{"prompt": "p"}\n', 3, "'completion'"),
    (GOOD + '{"prompt": 3, "completion": "c"}\n', 2, "'prompt'"),
    ('{"prompt": "p", "completion": ""}\n', 1, "'completion'"),
    (GOOD + '["p", "c"]\n', 2, "object"),
    (GOOD + '\n{"prompt": "p", "completion": null}\n', 3, "'completion'"),
    (GOOD.encode() + b'{"prompt": "\xff", "completion": "c"}\n', 2, "UTF-8"),
])
def test_load_jsonl_malformed(tmp_path, text, line, what):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        data.load_jsonl(path, ("prompt", "completion"))
    assert f"{path}:{line}:" in str(e.value) and what in str(e.value)


def test_load_judge(tmp_path):
    assert data.load_judge("data:judge") is data.judge
    src = "def longest(prompt, candidates):\n    return [len(c) for c in candidates]\n"
    f = write(tmp_path, src, name="myjudge.py")
    fn = data.load_judge(f"{f}:longest")
    assert data.call_judge(fn, "x", ["a", "abc"]) == [1.0, 3.0]
    for bad in ["data:nope", "data:ALPHABET", "no_such_module_xyz:f", "judge", f"{f}:missing"]:
        with pytest.raises(DataError, match="judge"):
            data.load_judge(bad)
    with pytest.raises(DataError):
        data.call_judge(lambda p, c: [1.0], "x", ["a", "b"])


# ---------------------------------------------------------------- batching

class PadIsEos:
    """GPT-2-like ids: pad == eos; byte-level encoding otherwise."""
    eos_id = pad_id = 300

    def encode(self, text):
        return list(text.encode())


def test_encode_pair_appends_eos_and_checks_length(tok):
    p, r = data.encode_pair(tok, "sort: cba\n", "abc", max_len=64)
    assert r[-1] == tok.eos_id and tok.decode(r[:-1]) == "abc" and tok.decode(p) == "sort: cba\n"
    with pytest.raises(DataError, match="prompt is 100 tokens"):
        data.encode_pair(tok, "x" * 100, "abc", max_len=64)   # prompt alone too long
    with pytest.raises(DataError, match="context"):
        data.encode_pair(tok, "sort: cba\n", "a" * 60, max_len=64)
    n = len(p) + len(r)
    assert data.encode_pair(tok, "sort: cba\n", "abc", max_len=n)  # exactly fits
    with pytest.raises(DataError):
        data.encode_pair(tok, "", "abc", max_len=64)


def test_collate_masks_keep_eos_when_pad_is_eos():
    t = PadIsEos()
    seqs = [data.encode_pair(t, "ab", "xyz", 16), data.encode_pair(t, "abcd", "q", 16)]
    b = data.collate(seqs, pad_id=t.pad_id)
    E = 300
    assert b["input_ids"].tolist() == [[97, 98, 120, 121, 122, E],
                                       [97, 98, 99, 100, 113, E]]
    assert b["input_ids"].dtype == torch.long
    assert b["attention_mask"].dtype == torch.bool and b["response_mask"].dtype == torch.bool
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert b["response_mask"].int().tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    # a shorter row: padding (same id as EOS) is outside both masks, the real EOS inside
    b = data.collate([data.encode_pair(t, "ab", "x", 16), seqs[0]], pad_id=t.pad_id)
    assert b["input_ids"][0].tolist() == [97, 98, 120, E, E, E]
    assert b["attention_mask"][0].int().tolist() == [1, 1, 1, 1, 0, 0]
    assert b["response_mask"][0].int().tolist() == [0, 0, 1, 1, 0, 0]


def test_collate_preferences_row_order():
    t = PadIsEos()
    prompts = [t.encode("p0"), t.encode("p11")]
    ch = [t.encode("c0") + [300], t.encode("c1") + [300]]
    rj = [t.encode("r0") + [300], t.encode("r1xx") + [300]]
    rf = [t.encode("f0") + [300], t.encode("f1") + [300]]
    b = data.collate_preferences(prompts, ch, rj, rf, pad_id=300)
    assert b["input_ids"].shape == (6, 8)
    rows = [bytes(x for x in row if x < 256).decode() for row in b["input_ids"].tolist()]
    assert rows == ["p0c0", "p11c1", "p0r0", "p11r1xx", "p0f0", "p11f1"]
    assert b["response_mask"].sum(1).tolist() == [3, 3, 3, 5, 3, 3]
    b2 = data.collate_preferences(prompts, ch, rj, pad_id=300)
    assert b2["input_ids"].shape[0] == 4
    with pytest.raises(ValueError):
        data.collate_preferences(prompts, ch, rj[:1], pad_id=300)


def test_batches():
    a = list(data.batches(10, 4, seed=3))
    assert a == list(data.batches(10, 4, seed=3)) and [len(x) for x in a] == [4, 4, 2]
    assert sorted(i for x in a for i in x) == list(range(10))
    assert list(data.batches(5, 2, shuffle=False, drop_last=True)) == [[0, 1], [2, 3]]

"""Tests for data.py: JSONL, judges, batching. Run: pytest -q tests/test_data.py"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import inputs  # noqa: E402
import tokenizer  # noqa: E402
from data import DataError  # noqa: E402
from tasks import sorting  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tokenizer.get_tokenizer(verbose=False)


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
    assert inputs.load_judge("tasks.sorting:judge") is sorting.judge
    src = "def longest(prompt, candidates):\n    return [len(c) for c in candidates]\n"
    f = write(tmp_path, src, name="myjudge.py")
    fn = inputs.load_judge(f"{f}:longest")
    assert data.call_judge(fn, "x", ["a", "abc"]) == [1.0, 3.0]
    for bad in ["data:nope", "data:ALPHABET", "no_such_module_xyz:f", "judge", f"{f}:missing"]:
        with pytest.raises(DataError, match="judge"):
            inputs.load_judge(bad)
    with pytest.raises(DataError):
        data.call_judge(lambda p, c: [1.0], "x", ["a", "b"])


# ---------------------------------------------------------------- batching

class PadIsEos:
    """GPT-2-like ids: pad == eos; byte-level encoding otherwise."""
    eos_id = pad_id = 300

    def encode(self, text):
        return list(text.encode())

    encode_prompt = encode

    def encode_response(self, text):
        return self.encode(text) + [self.eos_id]


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


def test_preference_rows_order():
    t = PadIsEos()
    prompts = [t.encode("p0"), t.encode("p11")]
    ch = [t.encode("c0") + [300], t.encode("c1") + [300]]
    rj = [t.encode("r0") + [300], t.encode("r1xx") + [300]]
    rf = [t.encode("f0") + [300], t.encode("f1") + [300]]
    examples = [data.Example(*ex) for ex in zip(prompts, ch, rj, ((f,) for f in rf))]
    b = data.collate(data.preference_rows(examples), pad_id=300)
    assert b["input_ids"].shape == (6, 8)
    rows = [bytes(x for x in row if x < 256).decode() for row in b["input_ids"].tolist()]
    assert rows == ["p0c0", "p11c1", "p0r0", "p11r1xx", "p0f0", "p11f1"]
    assert b["response_mask"].sum(1).tolist() == [3, 3, 3, 5, 3, 3]
    assert len(data.preference_rows([data.Example(*ex) for ex in zip(prompts, ch, rj)])) == 4  # DPO: no y_ref
    with pytest.raises(ValueError):  # every example needs as many y_refs
        data.preference_rows([examples[0], examples[1]._replace(y_refs=())])


def test_collate_shared_runs_each_prompt_once():
    ex = data.Example([1, 2, 3], [10, 11], [20], (30, 31, 32),)
    ex = ex._replace(y_refs=([30, 31, 32],))
    b = data.collate_shared([ex, data.Example([4], [12], [21, 22], ([33],))], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 10, 11, 20, 30, 31, 32], [4, 12, 21, 22, 33, 0, 0, 0, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]  # each response starts after the prompt
    assert b["predecessor"][0].tolist()[3:] == [2, 3, 2, 2, 6, 7]  # a first token follows the prompt's last
    assert b["part"][0].tolist() == [-1, -1, -1, 0, 0, 1, 2, 2, 2] and b["part"][1, 5:].tolist() == [-1] * 4
    mask = b["attention_mask"][0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True, False, False, False]  # rejected: prompt, itself
    assert mask[8].tolist() == [True, True, True, False, False, False, True, True, True]
    assert b["attention_mask"][1, 0, 6].tolist() == [True] + [False] * 5 + [True, False, False]  # padding: never a row of False
    assert data.collate_shared([ex], pad_id=0, length=12)["input_ids"].shape == (1, 12)


def test_batches():
    a = list(data.batches(10, 4, seed=3))
    assert a == list(data.batches(10, 4, seed=3)) and [len(x) for x in a] == [4, 4, 2]
    assert sorted(i for x in a for i in x) == list(range(10))
    assert list(data.batches(5, 2, shuffle=False, drop_last=True)) == [[0, 1], [2, 3]]


def test_jsonl_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'.encode())
    assert data.load_jsonl(str(path), ("prompt", "chosen", "rejected"))[0]["prompt"] == "a"
    # a BOM anywhere else is still what it is: a character inside a line, so bad JSON
    path.write_bytes('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'.encode() + b"\xef\xbb\xbf{}\n")
    with pytest.raises(DataError, match=":2: bad JSON"):
        data.load_jsonl(str(path), ("prompt", "chosen", "rejected"))


def test_chat_templates_without_jinja2_name_it(monkeypatch):
    import chat
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 -> ImportError
    template = chat.ChatTemplate("{{ messages[0].content }}", "dir", {}, "<|im_end|>")
    with pytest.raises(ValueError, match=r"^chat templates need jinja2: pip install jinja2$"):
        template.prompt([{"role": "user", "content": "hi"}])

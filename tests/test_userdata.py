"""Your own data through every stage, and every way user input can be wrong."""
import json
import os

import pytest
import torch

import train
from conftest import extra

JUDGE = '''
def judge(prompt, candidates):
    # toy ranker: the more of the letter to say ("say c:") a response repeats, the better
    want = prompt.strip()[-2]
    return [c.count(want) / max(1, len(c)) for c in candidates]
'''
SMALL = ["--model", "tiny", "--sft-steps", "30", "--iterations", "2", "--batch-size", "8",
         "--micro-batch-size", "4", "--max-new-tokens", "8"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    letters = "abcdefgh"
    sft = [{"prompt": f"say {c}:", "completion": c * 3} for c in letters * 4]
    prefs = [{"prompt": f"say {c}:", "chosen": c * 4, "rejected": "xyz"} for c in letters * 3]
    prompts = [{"prompt": f"say {c}:", "reference": c + "q"} for c in letters]
    (tmp_path / "myjudge.py").write_text(JUDGE)
    return {"--sft": write_jsonl(tmp_path / "sft.jsonl", sft),
            "--prefs": write_jsonl(tmp_path / "prefs.jsonl", prefs),
            "--prompts": write_jsonl(tmp_path / "prompts.jsonl", prompts),
            "--judge": str(tmp_path / "myjudge.py") + ":judge"}


def flags(files, **override):
    d = dict(files, **override)
    return [x for k, v in d.items() for x in (k, v)]


def test_jsonl_round_trip_through_every_stage(tmp_path, files):
    out = tmp_path / "out"
    results = train.run(train.parse_args(SMALL + flags(files) + ["--out-dir", str(out)]))
    assert [r["stage"] for r in results] == ["sft", "dpo", "selm_1", "selm_2"]
    assert json.load(open(out / "results.json")) == results
    for r in results:
        assert 0 <= r["win_rate_vs_reference"] <= 1 and 0 <= r["reward"] <= 1
        assert r["perfect"] is None  # "fully correct" means nothing to a user's judge
    online = [json.loads(l)["online"] for l in open(out / "metrics.jsonl") if '"online"' in l]
    assert online and all(o["pairs"] > 0 for o in online)


BAD = [
    ("--prefs", "", "empty file"),
    ("--prefs", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', ":2: bad JSON"),
    ("--prefs", '{"prompt": "a", "chosen": "b"}\n', ":1: missing field 'rejected'"),
    ("--prefs", '{"prompt": "a", "chosen": 3, "rejected": "c"}\n', "field 'chosen' must be a string"),
    ("--sft", '{"prompt": "a", "completion": ""}\n', "field 'completion' is empty"),
    ("--prompts", '{"prompt": "' + "x" * 70 + '"}\n', "leaves no room for a response"),
    ("--sft", '{"prompt": "' + "x" * 70 + '", "completion": "y"}\n', "context is 64"),
]


@pytest.mark.parametrize("flag,content,msg", BAD)
def test_malformed_input_is_one_clear_line(tmp_path, files, flag, content, msg):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + flags(files, **{flag: str(bad)}) + ["--out-dir", str(out)])
    err = str(e.value)
    assert msg in err and "\n" not in err, err
    assert not os.path.exists(out / "sft.pt")  # nothing trained on partial data


def test_judge_and_data_flags_must_come_together(tmp_path, files):
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + ["--prefs", files["--prefs"], "--out-dir", str(tmp_path)])
    assert "needs --prompts and --judge, with --prefs (offline pairs) or --train-prompts" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + flags(files, **{"--judge": "no_such_module_xyz:judge"}) + ["--out-dir", str(tmp_path)])
    assert "no_such_module_xyz" in str(e.value)


def test_init_from_missing_directory(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--init-from", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "o")])
    assert "nowhere" in str(e.value) and "\n" not in str(e.value)


def test_init_from_gpt2_directory_without_bpe_files_names_them(tmp_path, files):
    transformers = extra("transformers", "interop test")
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + flags(files) + ["--init-from", str(tmp_path / "gpt2"), "--sft-steps", "0",
                                           "--out-dir", str(tmp_path / "o")])
    msg = str(e.value)
    assert "merges.txt" in msg and "vocab.json" in msg and "\n" not in msg


FLAKY_JUDGE = '''
import os
COUNTER = os.path.join(os.path.dirname(__file__), "calls")

def judge(prompt, candidates):
    # scores like the toy judge above; while the file "fail_after" exists, the evaluation calls
    # (the ones that include a reference answer "REF...") fail once that many have been made
    limit = os.path.join(os.path.dirname(__file__), "fail_after")
    if any(c.startswith("REF") for c in candidates) and os.path.exists(limit):
        n = int(open(COUNTER).read()) if os.path.exists(COUNTER) else 0
        with open(COUNTER, "w") as f:
            f.write(str(n + 1))
        if n >= int(open(limit).read()):
            raise ConnectionError("reward service unavailable")
    want = prompt.strip()[-2]
    return [c.count(want) / max(1, len(c)) for c in candidates]
'''


def test_failing_judge_loses_no_training(tmp_path, files):
    """A judge that fails while a stage is evaluated: one line naming the judge, the stage and
    the prompt; the stage's training is on disk, and --resume only evaluates it."""
    (tmp_path / "flaky.py").write_text(FLAKY_JUDGE)
    prompts = [{"prompt": f"say {c}:", "reference": "REF" + c} for c in "abcdefgh"]
    f = dict(files, **{"--judge": str(tmp_path / "flaky.py") + ":judge",
                       "--prompts": write_jsonl(tmp_path / "p.jsonl", prompts)})
    ref = train.run(train.parse_args(SMALL + flags(f) + ["--out-dir", str(tmp_path / "ref")]))
    (tmp_path / "fail_after").write_text(str(2 * len(prompts)))  # sft and dpo evaluate, selm_1 fails
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + flags(f) + ["--out-dir", str(out)])
    msg = str(e.value)
    assert "\n" not in msg and "flaky:judge" in msg and "ConnectionError" in msg and "say " in msg, msg
    assert "stage selm_1" in msg and "selm_1.pt" in msg and "--resume evaluates it" in msg, msg
    assert torch.load(out / "selm_1.pt", weights_only=True)["evaluated"] is False
    assert [r["stage"] for r in json.load(open(out / "results.json"))] == ["sft", "dpo"]
    os.remove(tmp_path / "fail_after")
    before = os.path.getmtime(out / "dpo.pt")
    results = train.run(train.parse_args(SMALL + flags(f) + ["--out-dir", str(out), "--resume"]))
    assert results == ref and open(out / "results.json").read() == open(tmp_path / "ref" / "results.json").read()
    assert os.path.getmtime(out / "dpo.pt") == before  # nothing before selm_1 was redone
    steps = [(r["stage"], r["step"]) for r in map(json.loads, open(out / "metrics.jsonl")) if "step" in r]
    assert len(steps) == len(set(steps))  # selm_1 was trained once: its training lines appear once

"""Input that was checked only mid-run, after files were written, or blamed on the wrong thing,
or was a traceback (issue 31, 8 and 9): each is one line naming the file, line or field at
fault, before anything is written."""
import json
import os
from dataclasses import asdict

import pytest
import torch

import data
import sample
import train
from checkpoint import atomic_save
from model import GPT, preset
from test_userdata import SMALL, files, flags, write_jsonl  # noqa: F401 -- files is a fixture


def refused(argv, main=train.main):
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def fifo(path):
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("flag,content,msg", [
    ("--prompts", '{"prompt": "say a:", "reference": 5}\n', "prompts.jsonl:1: field 'reference' must be a string, "
                                                             "got int"),
    ("--prefs", '{"prompt": "a", "chosen": "b", "rejected": "c", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "prefs.jsonl:1: bad JSON: nested too deeply"),
    ("--prefs", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "x": 1' + "0" * 5000 + "}\n",
     "prefs.jsonl:2: bad JSON: Exceeds the limit (4300 digits) for integer string conversion"),
], ids=["reference-5", "nested-100000-deep", "5000-digit-integer"])
def test_bad_records_are_refused_before_anything_is_written(tmp_path, files, flag, content, msg):  # noqa: F811
    (tmp_path / flag[2:]).mkdir()
    bad = tmp_path / flag[2:] / f"{flag[2:]}.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    got = refused(SMALL + flags(files, **{flag: str(bad)}) + ["--out-dir", str(out)])
    assert msg in got, got
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--sft", "--prefs", "--prompts", "--start-from", "--judge"])
@pytest.mark.parametrize("special", ["fifo", "/dev/null"])
def test_a_fifo_or_a_device_is_no_file(tmp_path, files, flag, special):  # noqa: F811
    """They were called 'no such file' (and a FIFO would have been read forever)."""
    path = fifo(tmp_path / "pipe.py") if special == "fifo" else special
    value = f"{path}:judge" if flag == "--judge" else path
    got = refused(SMALL + flags(files, **{flag: value}) + ["--out-dir", str(tmp_path / "out")])
    assert f"{path} is not a regular file (a FIFO, a socket or a device)" in got.replace(": is", " is"), got
    assert not (tmp_path / "out").exists()


def test_a_prompt_that_encodes_to_no_tokens_names_its_line():
    """An evaluation prompt made only of bytes the vocabulary lacks became zero tokens and failed
    after sft.pt, with no file or line."""
    class Lacking:  # a tokenizer whose vocabulary lacks "\x01"
        def encode_prompt(self, text):
            return [ord(c) for c in text if c != "\x01"]

        encode_response = encode_prompt
    d = data.TrainingData([], [[]], [{"prompt": "ok", "reference": None}, {"prompt": "\x01\x01", "reference": None}],
                          judge=None, lines={"prompts": ["p.jsonl:1", "p.jsonl:2"]})
    with pytest.raises(data.DataError) as e:
        data.check_fits(d, Lacking(), 64, "sft", "prefs")
    assert str(e.value).startswith("p.jsonl:2: prompt '\\x01\\x01' encodes to no tokens")


def test_preference_records_as_prompts_keep_their_reference(tmp_path):
    """The README's 'preference records as --prompts': a plain-string record's chosen answer is
    the reference (it was lost, and win_rate_vs_reference was null)."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    d = data.load_user_data(None, prefs, prefs, 1)
    assert [e["reference"] for e in d.eval] == ["b", "b"]


def test_a_judge_score_too_large_for_a_float_is_one_line():
    def judge(prompt, candidates):
        return [10 ** 400] * len(candidates)
    with pytest.raises(data.JudgeError) as e:
        data.call_judge(judge, "p", ["a", "b"])
    assert "returned non-numeric scores" in str(e.value) and len(str(e.value)) < 300


# ---- checkpoints whose fields are wrong -------------------------------------------------------

def checkpoint(path, **change):
    m = GPT(preset("tiny", vocab_size=258))
    ck = {"model": m.state_dict(), "model_config": asdict(m.config), "prompt_template": "sort: {prompt}\n",
          "tokenizer": {"name": "bytes", "source": None}}
    for k, v in change.items():
        if k in ck["model_config"]:
            ck["model_config"][k] = v
        elif v is None:
            ck.pop(k)
        else:
            ck[k] = v
    atomic_save(ck, str(path))
    return str(path)


@pytest.mark.parametrize("change,msg", [
    (dict(prompt_template=5), "field 'prompt_template' must be str, got int"),
    (dict(tokenizer=[1]), "field 'tokenizer' must be dict or str, got list"),
    (dict(tokenizer={"name": "bytes", "source": 5}),
     "its metrics_size, results, sft_answers or tokenizer are not what train.py writes"),
    (dict(vocab_size="258"), "model_config field 'vocab_size' must be an integer >= 1, got '258'"),
    (dict(n_layer=0), "model_config field 'n_layer' must be an integer >= 1, got 0"),
    (dict(dropout=float("nan")), "model_config field 'dropout' must be a finite number >= 0, got nan"),
    (dict(n_head=3), "its model_config describes no model (n_head must be a multiple of n_kv_head)"),
])
def test_sample_names_the_checkpoints_bad_field(tmp_path, change, msg):
    """A bad model_config was reported as '--device cpu: ...'; a field of another type was a traceback."""
    path = checkpoint(tmp_path / "m.pt", **change)
    got = refused(["--ckpt", path, "--prompt", "x"], sample.main)
    assert got == f"sample.py: error: checkpoint {path}: {msg}", got


@pytest.mark.parametrize("field", ["config", "stage", "results"])
def test_resume_and_start_from_need_a_stage_checkpoint(tmp_path, field):
    """--resume or --start-from on a checkpoint without config or stage was a KeyError."""
    fast = ["--model", "tiny", "--n-sft", "64", "--chunk-size", "8", "--n-eval", "4", "--sft-steps", "2",
            "--iterations", "1"]
    out = tmp_path / "out"
    train.run(train.parse_args(fast + ["--out-dir", str(out), "--iterations", "0"]))
    ck = torch.load(out / "dpo.pt", weights_only=True)
    ck.pop(field)
    torch.save(ck, out / "dpo.pt")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    for how in (["--resume", "--out-dir", str(out)], ["--start-from", str(out / "dpo.pt"), "--out-dir",
                                                      str(tmp_path / "new")]):
        got = refused(fast + ["--iterations", "0"] + how)
        assert f"checkpoint {out / 'dpo.pt'} lacks field {field!r}" in got, got
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert not (tmp_path / "new").exists()


def test_a_judge_returning_10_to_the_400_is_one_line(tmp_path, files):  # noqa: F811
    (tmp_path / "huge.py").write_text("def judge(p, c):\n    return [10 ** 400] * len(c)\n")
    got = refused(SMALL + flags(files, **{"--judge": f"{tmp_path}/huge.py:judge"}) + ["--out-dir", str(tmp_path / "o")])
    assert "judge huge:judge on prompt" in got and "non-numeric" in got, got
    assert json.load(open(tmp_path / "o" / "results.json")) == []  # SFT's training kept; its evaluation failed

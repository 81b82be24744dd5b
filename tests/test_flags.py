"""Every flag of every command walked through bad values of its type: each is refused in one
line that names the flag, before anything is written. A flag added later without a check
fails here; a value of a bad-looking shape that is in fact fine is allowed below, with the
reason."""
import dataclasses
import math
import os

import pytest

import train

# Values of each type that are wrong for most flags; FINE lists where one is right.
BAD_BY_TYPE = {int: [-1, 0], float: [-1.0, 0.0, math.nan, math.inf], str: ["", "no-such-thing"]}
# Values of a good shape but out of a flag's range
BAD_EXTRA = {"block_size": [1, 10 ** 9], "seed": [2 ** 32], "task_seed": [2 ** 32], "dropout": [1.0],
             "warmup": [1.5], "max_len": [10 ** 6]}
FINE = {
    ("iterations", 0): "0 iterations stop after offline DPO",
    ("sft_steps", 0): "0 steps skip SFT training (a pretrained --init-from model)",
    ("kl_samples", 0): "0 samples skip the KL estimate",
    ("seed", 0): "seeds start at 0",
    ("task_seed", 0): "seeds start at 0",
    ("alpha", 0.0): "alpha 0 is iterative DPO",
    ("dropout", 0.0): "no dropout",
    ("weight_decay", 0.0): "no weight decay",
    ("grad_clip", 0.0): "0 switches clipping off",
    ("warmup", 0.0): "no warmup",
    ("out_dir", "no-such-thing"): "a directory that is not there yet is made",
    ("export", ""): "the default: nothing exported",
}


def bad_values(fields, extra=BAD_EXTRA, fine=FINE):
    """[(name, value)] for every field of a type in BAD_BY_TYPE, less the FINE ones."""
    return [(f.name, v) for f in fields for v in BAD_BY_TYPE.get(f.type, []) + extra.get(f.name, [])
            if (f.name, v) not in fine]


def test_the_allow_list_names_real_flags():
    names = {f.name for f in dataclasses.fields(train.Config)}
    assert {n for n, _ in FINE} <= names and set(BAD_EXTRA) <= names


def reached_setup(*args, **kw):
    raise AssertionError("a bad value got through check_config: the run reached setup()")


@pytest.mark.parametrize("name,value", bad_values(dataclasses.fields(train.Config)),
                         ids=lambda x: repr(x) if not isinstance(x, str) or x == "" else x)
def test_every_train_flag_refuses_its_bad_values(tmp_path, monkeypatch, name, value):
    monkeypatch.setattr(train, "setup", reached_setup)
    flag = "--" + name.replace("_", "-")
    out = tmp_path / "out"
    argv = ["--model", "tiny", flag, str(value)] + (["--out-dir", str(out)] if name != "out_dir" else [])
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value)
    assert msg.startswith("train.py: error: ") and flag in msg and "\n" not in msg, msg
    assert not out.exists()  # nothing written


COMBINATIONS = [
    (["--batch-size", "10", "--micro-batch-size", "4"], "not a multiple of --micro-batch-size"),
    (["--min-len", "9", "--max-len", "8"], "--max-len 8 is below --min-len 9"),
    (["--max-len", "64"], "leaves no room in the context of 64 tokens"),
    (["--resume", "--start-from", __file__], "--start-from and --resume exclude each other"),
    (["--optimism-samples", "2"], "needs --y-ref sampled"),
    (["--fsdp"], "start it with torchrun"),
    (["--prefs", __file__], "--prefs, --prompts and --judge together"),
    (["--offline-passes", "2,2"], "lo and hi must differ"),
    (["--sft", os.path.dirname(__file__)], "is a directory, not a file"),
    (["--judge", __file__.replace(".py", ".pyc") + ":judge"], "no file"),
    (["--judge", "rm:" + os.path.dirname(__file__)], "no config.json"),
    (["--judge", "x"], "expected 'module:function'"),
]


@pytest.mark.parametrize("flags,msg", COMBINATIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_impossible_combinations_are_one_line(tmp_path, monkeypatch, flags, msg):
    monkeypatch.setattr(train, "setup", reached_setup)
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "tiny", "--out-dir", str(tmp_path / "out")] + flags)
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()

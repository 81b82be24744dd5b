"""`train.py --task instructions` end to end on a tiny random Llama with a ChatML tokenizer
trained here: the offline pairs are the starting model's own answers, cached in the out-dir
and reused; every stage runs and reports IFEval's figures; a kill -9 while the pairs are being
made, then the same command again, gives the same results.json as a run never interrupted.

A random model's answers never mention the request's topic, so the built-in judge would score
them all 0 and tie every prompt: these runs judge with a stand-in that scores any text (a fake
judge set in the task's TASK before train.py starts), while the real judge is tasks/instructions.py's
own tests' subject and the real model's run is in test_real_chat.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chat_dirs import tiny_chat_model  # noqa: E402
from conftest import extra  # noqa: E402

extra("tokenizers", "trains a chat tokenizer")
extra("jinja2", "renders the chat template")
extra("safetensors", "writes the model directory")

# train.py, with the built-in judge replaced by one that scores any answer (its distinct
# characters): the pipeline is what is tested here, not the judge
RUN = """
import sys, time
sys.path.insert(0, {root!r})
from tasks import instructions
def stand_in(prompt, candidates):
    open({marker!r}, "a").close()  # the test knows when judging has begun
    time.sleep({delay})  # the pairs take long enough to be killed while they are made
    return [len(set(c)) / 100 for c in candidates]
instructions.TASK = instructions.TASK._replace(judge=stand_in)
import train
train.main({argv!r})
"""


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with a ChatML tokenizer and template, as a Hugging Face directory."""
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def argv(model, out, *extra):
    return ["--init-from", model, "--task", "instructions", "--out-dir", str(out), "--iterations", "1",
            "--chunk-size", "6", "--n-eval", "4", "--max-new-tokens", "6", "--pair-samples", "3",
            "--batch-size", "2", "--micro-batch-size", "2", "--gen-batch-size", "4", *extra]


def train(model, out, *extra, delay=0.0):
    marker = f"{out}.judging"
    code = RUN.format(root=ROOT, argv=argv(model, out, *extra), delay=delay, marker=marker)
    return subprocess.Popen([sys.executable, "-c", code],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("instructions-run")
    proc = train(chat_model, out)
    log = proc.communicate()[0]
    assert proc.returncode == 0, log[-3000:]
    return out, log


def test_every_stage_runs_and_reports_ifeval(reference):
    out, log = reference
    rows = json.load(open(out / "results.json"))
    assert [r["stage"] for r in rows] == ["sft", "dpo", "selm_1"]
    for r in rows:
        assert 0 <= r["prompt_accuracy"] <= r["instruction_accuracy"] <= 1 or r["instruction_accuracy"] == 0
        assert r["perfect"] == r["prompt_accuracy"]  # score 1.0 iff every constraint is met
    assert "prompt acc" in log and "instructions.py" in log


def test_the_pairs_are_the_models_answers_cached_and_reused(reference, chat_model, tmp_path):
    out, _ = reference
    lines = [json.loads(x) for x in open(out / "instruction_pairs.jsonl")]
    header, pairs = lines[0], lines[1:]
    assert header["settings"]["k"] == 3 and sorted({p["chunk"] for p in pairs}) == [0, 1]
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    # a second run in another directory, started from the first run's offline DPO stage, finds
    # the pairs there instead of sampling them again (the judge would sleep 1 s per prompt)
    t0 = time.time()
    proc = train(chat_model, tmp_path / "arm", "--start-from", str(out / "dpo.pt"), delay=1.0)
    log = proc.communicate()[0]
    assert proc.returncode == 0, log[-3000:]
    assert (tmp_path / "arm" / "instruction_pairs.jsonl").read_bytes() == (out / "instruction_pairs.jsonl").read_bytes()
    # the judge still ran for the evaluations (2 stages) and the iteration, not for 12 pair prompts
    assert time.time() - t0 < 60


def test_sigkill_while_the_pairs_are_made_then_rerun(reference, chat_model, tmp_path):
    out = tmp_path / "killed"
    proc = train(chat_model, out, delay=0.5)
    deadline = time.time() + 120
    while not os.path.exists(f"{out}.judging") and time.time() < deadline:
        time.sleep(0.2)  # the starting model's answers to chunk 0 are being sampled, then judged
    time.sleep(1.0)  # judging chunk 0 (0.5 s a prompt): the pairs file is not written yet
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "instruction_pairs.jsonl").exists()  # written whole or not at all
    assert not list(out.glob("*.pt"))  # no stage finished: the same command starts again (--resume has nothing)
    again = train(chat_model, out)
    log = again.communicate()[0]
    assert again.returncode == 0, log[-3000:]
    assert (out / "results.json").read_bytes() == (reference[0] / "results.json").read_bytes()
    assert not [f for f in os.listdir(out) if f.startswith((".tmp", ".selm-tmp"))]


def test_answers_cut_off_are_counted_and_trained_unfinished(reference):
    """A random model's answers of 6 tokens rarely end: they are kept unfinished (no EOS is
    appended to them in training), and the run's record counts them."""
    out, log = reference
    rows = [json.loads(x) for x in open(out / "instruction_pairs.jsonl")][1:]
    cut = sum(not r[f] for r in rows for f in ("chosen_finished", "rejected_finished"))
    assert cut > 0
    offline = [json.loads(x)["offline_pairs"] for x in open(out / "metrics.jsonl") if '"offline_pairs"' in x]
    assert len(offline) == 1 and offline[0]["unfinished_chosen"] + offline[0]["unfinished_rejected"] == cut
    assert offline[0]["pairs"] == [sum(r["chunk"] == i for r in rows) for i in (0, 1)]
    assert f"{cut} offline answers cut off at --max-new-tokens 6" in log


def test_the_pairs_cache_is_keyed_on_everything_that_shapes_them(chat_model, tmp_path):
    """The issue's case: the key missed the chat template and --gen-batch-size (which sets the
    sampling seeds), so a run read pairs another setting had made."""
    import dataclasses

    import torch

    import chat
    import inputs
    import runtime
    import train as T
    from chat_dirs import chat_tokenizer
    from pairs import pair_settings
    from tasks import instructions
    from tokenizer import get_tokenizer
    cfg = T.parse_args(argv(chat_model, tmp_path / "o"))
    inputs.check_config(cfg)
    tok = get_tokenizer(chat_model, verbose=False)
    template = chat.load_template(tok)
    model = inputs.build_model(cfg, tok, runtime.setup("cpu", "auto", str(tmp_path)))
    rt = runtime.setup("cpu", "auto", str(tmp_path))
    judge = instructions.judge
    key = pair_settings(cfg, tok, model, template, rt, judge)
    assert pair_settings(cfg, tok, model, template, rt, judge) == key
    other = tmp_path / "other-tokenizer"
    chat_tokenizer(other, "llama3")
    changed = torch.nn.Linear(1, 1)
    heavier = inputs.build_model(cfg, tok, rt)
    with torch.no_grad():
        heavier.lm_head.weight[0, 0] += 1
    for what, args in {
            "template": (cfg, tok, model, chat.ChatTemplate(template.text + " ", template.source, template.specials,
                                                            template.end_of_turn), rt, judge),
            "gen_batch_size": (dataclasses.replace(cfg, gen_batch_size=3), tok, model, template, rt, judge),
            "max_new_tokens": (dataclasses.replace(cfg, max_new_tokens=5), tok, model, template, rt, judge),
            "tokenizer": (cfg, get_tokenizer(str(other), verbose=False), model, template, rt, judge),
            "model": (cfg, tok, heavier, template, rt, judge),
            "dtype": (cfg, tok, model, template, dataclasses.replace(rt, dtype=None if rt.dtype else torch.bfloat16),
                      judge),
            "device": (cfg, tok, model, template, dataclasses.replace(rt, device=torch.device("meta")), judge),
            "judge": (cfg, tok, model, template, rt, lambda prompt, candidates: [0.0] * len(candidates))}.items():
        assert pair_settings(*args)[what] != key[what], what
    del changed


def test_answers_that_cannot_fit_are_refused_before_sampling(chat_model, tmp_path, monkeypatch):
    """The issue's case: with --block-size 100 on SmolLM2 the pairs were sampled and cached for
    38 s, then a pair did not fit. The settings are refused before any sampling."""
    import train as T

    def sampled(*args, **kw):
        raise AssertionError("the starting model was sampled")
    import runtime
    monkeypatch.setattr(runtime.Runtime, "sample", sampled)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        T.main(argv(chat_model, out, "--max-new-tokens", "1000"))
    msg = str(e.value)
    assert "--max-new-tokens 1000: an answer that long and its end-of-turn token do not fit" in msg, msg
    assert "in the context of 1024 (--block-size)" in msg and "\n" not in msg
    assert not out.exists()


def test_a_damaged_cache_is_refused_by_every_kind_of_run(reference, chat_model, tmp_path, monkeypatch):
    """The issue's case: a cache cut to its header and two pairs was read as valid. A fresh run
    (the cache alone in its out-dir), --resume and --start-from (the cache beside the stage
    started from) each refuse it in one line, and change nothing."""
    import shutil

    import train as T
    from pairs import PAIRS_FILE
    from tasks import instructions

    def stand_in(prompt, candidates):  # the reference run's judge, by name: the cache's key names it
        raise AssertionError("judged: the damaged cache was not refused before sampling")
    stand_in.__module__, stand_in.__qualname__ = "__main__", "stand_in"
    monkeypatch.setattr(instructions, "TASK", instructions.TASK._replace(judge=stand_in))
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    cache = run / PAIRS_FILE
    cache.write_text("".join(cache.read_text().splitlines(keepends=True)[:3]))
    (tmp_path / "fresh").mkdir()
    shutil.copy(cache, tmp_path / "fresh")
    for out, how in [(tmp_path / "fresh", []), (run, ["--resume"]),
                     (tmp_path / "arm", ["--start-from", str(run / "dpo.pt")])]:
        before = {n: (run / n).read_bytes() for n in os.listdir(run) if os.path.isfile(run / n)}
        with pytest.raises(SystemExit) as e:
            T.main(argv(chat_model, out, *how))
        msg = str(e.value)
        assert f"{PAIRS_FILE}: damaged (its header counts" in msg and "\n" not in msg, msg
        assert {n: (run / n).read_bytes() for n in os.listdir(run) if os.path.isfile(run / n)} == before
    assert os.listdir(tmp_path / "fresh") == [PAIRS_FILE] and not (tmp_path / "arm").exists()


def test_instructions_needs_a_chat_model(tmp_path):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(["--task", "instructions", "--out-dir", str(tmp_path / "o")])
    assert "--init-from" in str(e.value)
    assert not (tmp_path / "o").exists()

"""`train.py --task instructions` end to end on a tiny random Llama with a ChatML tokenizer
trained here: the offline pairs are the starting model's own answers, cached in the out-dir
and reused; every stage runs and reports IFEval's figures; a kill -9 while the pairs are being
made, then the same command again, gives the same results.json as a run never interrupted.

A random model's answers never mention the request's topic, so the built-in judge would score
them all 0 and tie every prompt: these runs judge with a stand-in that scores any text (a fake
judge set in instructions.py before train.py starts), while the real judge is instructions.py's
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

from chat_dirs import chat_tokenizer  # noqa: E402

pytest.importorskip("tokenizers", reason="trains a chat tokenizer: pip install -r requirements-dev.txt")
pytest.importorskip("jinja2", reason="renders the chat template: pip install -r requirements-dev.txt")
pytest.importorskip("safetensors", reason="writes the model directory: pip install -r requirements-dev.txt")

# train.py, with the built-in judge replaced by one that scores any answer (its distinct
# characters): the pipeline is what is tested here, not the judge
RUN = """
import sys, time
sys.path.insert(0, {root!r})
import instructions
def stand_in(prompt, candidates):
    open({marker!r}, "a").close()  # the test knows when judging has begun
    time.sleep({delay})  # the pairs take long enough to be killed while they are made
    return [len(set(c)) / 100 for c in candidates]
instructions.judge = stand_in
import train
train.main({argv!r})
"""


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with a ChatML tokenizer and template, as a Hugging Face directory."""
    import hf
    from model import GPT, preset
    d = tmp_path_factory.mktemp("tiny-chat")
    vocab = chat_tokenizer(d, "chatml")
    hf.save_pretrained(GPT(preset("tiny", vocab_size=vocab, model_type="llama", block_size=1024)), str(d),
                       tokenizer_dir=str(d))
    return str(d)


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
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_instructions_needs_a_chat_model(tmp_path):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(["--task", "instructions", "--out-dir", str(tmp_path / "o")])
    assert "--init-from" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_the_pairs_file_names_a_dtype_other_than_fp32(chat_model, tmp_path, monkeypatch):
    """Pairs sampled in bf16 are other answers than fp32's: the cache's settings say so, and an
    fp32 run's settings are those of before (so the files earlier runs made still serve)."""
    import inputs
    import instructions
    import runtime
    import train as train_py
    cfg = train_py.parse_args(argv(chat_model, tmp_path / "out"))
    inputs.check_config(cfg)
    seen = []

    def cached(out, chunks, sample, k, seed, settings, **kw):
        seen.append(settings)
        return [[{"prompt": "p", "chosen": "a", "rejected": "b"}] for _ in chunks]
    monkeypatch.setattr(instructions, "cached_pairs", cached)
    for dtype in ("float32", "bfloat16"):
        rt = runtime.setup("cpu", dtype, str(tmp_path))
        tok, task_data = inputs.tokenizer_and_data(cfg, rt)
        train_py.instruction_pairs(rt, cfg, tok, inputs.build_model(cfg, tok, rt), task_data)
    assert "dtype" not in seen[0] and seen[1]["dtype"] == "bfloat16"

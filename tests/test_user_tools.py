"""After a run, the tools a user reaches for: sample.py on a checkpoint or a model directory (one
prompt, a file of prompts, a chat, a comparison), tools.evaluate reproducing a stage's row,
experiments.plots drawing the run; and what a run tells about itself: its bars, its first and
last screens, the size of what it leaves on disk."""
import contextlib
import io
import json
import os
import sys

import pytest
import torch

import chat
import inputs
import runtime
import sample
import screens
import train
import training
from checkpoint import disk_usage, human_size, load_checkpoint
from tools import evaluate
from conftest import extra

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--n-sft", "256", "--chunk-size", "32", "--n-eval", "16", "--sft-steps", "20",
        "--iterations", "1", "--gen-batch-size", "8", "--batch-size", "8", "--micro-batch-size", "8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run: its directory, what it printed, and its size on disk when it ended."""
    out = tmp_path_factory.mktemp("run")
    screen = io.StringIO()
    with contextlib.redirect_stdout(screen):
        train.run(train.parse_args(FAST + ["--out-dir", str(out)]))
    return out, screen.getvalue(), disk_usage(out)


# ---- tools.evaluate ---------------------------------------------------------------------------

def evaluated(capsys, *argv):
    evaluate.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_evaluate_reproduces_each_stage_row(run, tmp_path, capsys):
    out, _, _ = run
    rows = json.load(open(out / "results.json"))
    logged = [r["answers"] for r in runtime.read_metrics(out / "metrics.jsonl") if "eval" in r]
    for row, answers in zip(rows, logged):
        printed = evaluated(capsys, out / f"{row['stage']}.pt", "--out", tmp_path / "e.json")
        got = json.load(open(tmp_path / "e.json"))
        assert {k: got[k] for k in row} == row  # number for number, the KL of its samples included
        assert [a["answer"] for a in got["answers"]] == answers
        assert f"[{row['stage']:>7}]" in printed and f"wrote {tmp_path / 'e.json'}" in printed
    assert rows[-1]["kl"] != 0 and rows[-1]["win_rate_vs_sft"] != 0.5  # the SFT model was the reference


def test_evaluate_on_your_prompts_with_a_judge(run, tmp_path, capsys):
    out, _, _ = run
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "language"}\n{"prompt": "dcbagfe", "id": 7}\n')
    evaluated(capsys, out / "selm_1.pt", "--prompts", prompts, "--judge", "tasks.sorting:judge")
    got = json.load(open(out / "selm_1.eval.json"))  # the default: beside the checkpoint
    assert [a["prompt"] for a in got["answers"]] == ["sort: language\n", "sort: dcbagfe\n"]  # the run's template
    assert 0 <= got["reward"] <= 1 and got["perfect"] is not None and got["win_rate_vs_reference"] is None
    assert "prompt_accuracy" not in got
    # the instruction judge: IFEval's accuracies for a prompt it can read, one line for one it cannot
    prompts.write_text('{"prompt": "Write a haiku about tea. Answer in at most 30 words."}\n')
    evaluated(capsys, out / "selm_1.pt", "--prompts", prompts, "--judge", "tasks.instructions:judge",
              "--out", tmp_path / "i.json")
    assert {"prompt_accuracy", "instruction_accuracy"} <= set(json.load(open(tmp_path / "i.json")))
    prompts.write_text('{"prompt": "hello"}\n')
    with pytest.raises(SystemExit) as e:
        evaluated(capsys, out / "selm_1.pt", "--prompts", prompts, "--judge", "tasks.instructions:judge")
    assert "states no constraint this judge can check" in str(e.value) and "\n" not in str(e.value)


def test_evaluate_a_model_directory(tmp_path, capsys):
    extra("tokenizers", "tokenizers builds the chat model's tokenizer")
    extra("jinja2", "jinja2 renders its chat template")
    extra("safetensors", "safetensors writes its weights")
    d = chat_model(tmp_path)
    evaluated(capsys, d, "--max-new-tokens", "4", "--out", tmp_path / "e.json")
    got = json.load(open(tmp_path / "e.json"))
    assert got["stage"] == "chat" and got["win_rate_vs_sft"] == 0.5 and got["kl"] == 0  # against itself
    assert len(got["answers"]) == 256 and "prompt_accuracy" in got  # the instruction task's held-out prompts
    assert got["answers"][0]["prompt"].startswith("<|im_start|>")  # in the model's chat template


# ---- sample.py --------------------------------------------------------------------------------

def sampled(capsys, *argv, stdin=None):
    if stdin is not None:
        sample_stdin = io.StringIO(stdin)
        with contextlib.redirect_stdout(io.StringIO()) as captured:
            old, sys.stdin = sys.stdin, sample_stdin
            try:
                sample.main([str(a) for a in argv])
            finally:
                sys.stdin = old
        return captured.getvalue()
    sample.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_answers_print_as_plain_text(run, capsys):
    out, _, _ = run
    printed = sampled(capsys, "--ckpt", out / "selm_1.pt", "--prompt", "language", "--temperature", "0")
    from hf import load_model
    loaded = load_model(str(out / "selm_1.pt"))  # the answer, decoded: the text and a newline, no quotes
    (r,), _ = sample.generate(loaded.model, [loaded.encode("language")], 64, 0.0, eos_id=loaded.tok.eos_ids,
                              pad_id=loaded.tok.pad_id)
    assert printed == loaded.tok.decode([t for t in r if t not in loaded.tok.eos_ids]) + "\n"
    assert loaded.prompt("language") == "sort: language\n" and not printed.startswith("'")


def test_a_file_of_prompts_answered_as_json_lines(run, tmp_path, capsys):
    out, _, _ = run
    (tmp_path / "plain.txt").write_text("language\n\ndcbagfe\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "language", "id": 1}\n{"prompt": "dcbagfe", "id": 2}\n')
    lines = sampled(capsys, "--ckpt", out / "selm_1.pt", "--prompts", tmp_path / "plain.txt", "--temperature", "0",
                    "--compare", out / "sft.pt", "--batch-size", "1").splitlines()
    recs = [json.loads(x) for x in lines]
    assert [(r["prompt"], r["model"]) for r in recs] == [(p, str(out / m)) for p in ("language", "dcbagfe")
                                                         for m in ("selm_1.pt", "sft.pt")]
    assert all(isinstance(r["answer"], str) and isinstance(r["finished"], bool) for r in recs)
    one = sampled(capsys, "--ckpt", out / "selm_1.pt", "--prompt", "language", "--temperature", "0")
    assert one == recs[0]["answer"] + "\n"  # batched as one prompt alone
    target = tmp_path / "answers.jsonl"
    assert sampled(capsys, "--ckpt", out / "selm_1.pt", "--prompts", tmp_path / "p.jsonl", "--num-samples", "2",
                   "--out", target) == ""
    recs = [json.loads(x) for x in target.read_text().splitlines()]
    assert [r["id"] for r in recs] == [1, 1, 2, 2]  # the record's own fields carried along
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_a_comparison_is_labelled(run, capsys):
    out, _, _ = run
    printed = sampled(capsys, "--ckpt", out / "selm_1.pt", "--prompt", "language", "--compare", out / "sft.pt",
                      "--num-samples", "2")
    labels = [x for x in printed.splitlines() if x.startswith("[")]
    assert labels == [f"[{out / m}, sample {k}]" for m in ("selm_1.pt", "sft.pt") for k in (1, 2)]


@pytest.mark.parametrize("content,msg", [('{"prompt": "language"}\n{"text": "x"}\n', "p.txt:2: missing field 'prompt'"),
                                         ("language\n" + "x" * 80 + "\n", "p.txt:2: the prompt's"),
                                         ("\n\n", "no prompts in it")])
def test_bad_prompts_are_one_line(run, tmp_path, content, msg):
    out, _, _ = run
    (tmp_path / "p.txt").write_text(content)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(out / "selm_1.pt"), "--prompts", str(tmp_path / "p.txt"), "--out",
                     str(tmp_path / "a.jsonl")])
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "a.jsonl").exists()


def test_chat_without_a_template_answers_each_line(run, capsys):
    out, _, _ = run
    printed = sampled(capsys, "--ckpt", out / "selm_1.pt", "--chat", "--temperature", "0",
                      stdin="language\ndcbagfe\n\nnot read\n")
    assert "no chat template" in capsys.readouterr().err
    alone = [sampled(capsys, "--ckpt", out / "selm_1.pt", "--prompt", p, "--temperature", "0")
             for p in ("language", "dcbagfe")]
    assert printed == "".join(alone)


def test_chat_is_one_conversation_in_the_chat_template(tmp_path, monkeypatch):
    extra("tokenizers", "tokenizers builds the chat model's tokenizer")
    extra("jinja2", "jinja2 renders its chat template")
    extra("safetensors", "safetensors writes its weights")
    d = chat_model(tmp_path)
    seen, real = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda m, ps, *a, **k: seen.append(ps[0]) or real(m, ps, *a, **k))
    printed = sampled(None, "--ckpt", d, "--chat", "--max-new-tokens", "3", "--seed", "1",
                      stdin="hello there\nand again\n/exit\nnot read\n")
    from hf import load_model
    loaded = load_model(str(d))
    first, second = (loaded.tok.decode(p) for p in seen)
    reply = printed.splitlines()[0] if printed.splitlines() else ""
    assert len(seen) == 2 and second.startswith(first)  # the whole conversation, every turn
    assert "hello there" in first and "and again" in second and "and again" not in first
    assert first.startswith("<|im_start|>") and second.count("<|im_start|>assistant") == 2
    assert reply in second[len(first):]


def test_a_conversation_forgets_its_oldest_exchange_when_it_outgrows_the_context():
    template = chat.ChatTemplate("{% for m in messages %}[{{ m.content }}]{% endfor %}", "t", {}, "</s>")
    c = chat.Conversation(template, fits=lambda p: len(p) <= 12)
    assert c.ask("aaaa") == "[aaaa]"
    c.answered("bbbb")
    assert c.ask("cc") == "[cc]" and c.forgotten == 1  # [aaaa][bbbb][cc] is 16 characters
    c.answered("dd")
    assert c.ask("x" * 20) is None and c.messages == []  # a turn that alone does not fit


def test_help_shows_every_default(capsys):
    from experiments import plots
    for ap in (sample.parser(), evaluate.parser(), plots.parser()):
        text = " ".join(ap.format_help().split())
        for a in ap._actions:
            if a.option_strings and a.default not in (None, False, "==SUPPRESS=="):
                assert f"(default: {a.default})" in text, (ap.prog, a.dest)
            elif a.option_strings and a.default is None and a.nargs != 0:
                assert a.help.count("(default") <= 1  # told in the help where there is one to tell
    assert "(default: all)" in " ".join(sample.parser().format_help().split())


# ---- the run's bars and screens -----------------------------------------------------------------

class Bar:
    """A progress bar that records what it is told."""

    def __init__(self, iterable=None, desc="", total=None):
        self.iterable, self.desc, self.total, self.n, self.postfix, self.closed = iterable, desc, total, 0, [], False

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n):
        self.n += n

    def set_postfix(self, figures, refresh=True):
        self.postfix.append(figures)

    def close(self):
        self.closed = True


def test_every_phase_has_a_bar_with_its_count(tmp_path, monkeypatch):
    from model import GPT, preset
    rt = runtime.setup("cpu", "float32", str(tmp_path))
    bars = []
    monkeypatch.setattr(rt, "bar", lambda it, desc, total=None: bars.append(Bar(it, desc, total)) or bars[-1])
    m = GPT(preset("tiny", vocab_size=258))
    prompts = [[1, 2, 3]] * 10
    rt.sample(m, prompts, 3, progress="answers", max_new_tokens=2)
    phase = Bar(total=20)
    for seed in (0, 1):  # one phase of two calls: one bar advanced by both
        rt.sample(m, prompts, 4, seed, phase, max_new_tokens=2)
    assert [(b.desc, b.total, b.n, b.closed) for b in bars] == [("answers", 10, 10, True)]
    assert phase.n == 20 and not phase.closed
    rt.logps(m, [(p, [4, 5]) for p in prompts], 0, 4, progress="log-probs")
    rt.judge(lambda p, c: [0.0] * len(c), ["x"] * 5, [["a", "b"]] * 5, 2, progress="judging")
    assert [(b.desc, b.n, b.closed) for b in bars[1:]] == [("log-probs", 10, True), ("judging", 5, True)]
    rt.ranks.main = False
    assert runtime.Runtime.bar(rt, [], "x").disable  # rank 0's bars only


def test_the_training_bar_shows_every_step(tmp_path, monkeypatch):
    from model import GPT, preset
    cfg = inputs.resolve(train.parse_args(FAST + ["--out-dir", str(tmp_path), "--batch-size", "4",
                                                  "--micro-batch-size", "4"]))
    tok, d = inputs.tokenizer_for(cfg), inputs.load_data(cfg)
    rt = runtime.setup("cpu", "float32", str(tmp_path))
    bars = []
    monkeypatch.setattr(rt, "bar", lambda it, desc, total=None: bars.append(Bar(it, desc, total)) or bars[-1])
    torch.manual_seed(0)
    train.offline_dpo(rt, cfg, tok, GPT(preset("tiny", vocab_size=tok.vocab_size)), d.chunks[0])
    (bar,) = [b for b in bars if b.desc == "dpo"]
    logged = [r for r in runtime.read_metrics(tmp_path / "metrics.jsonl") if r.get("stage") == "dpo"]
    assert len(bar.postfix) == 8 and [r["step"] for r in logged] == [0, 7]  # every step; the log as before
    assert bar.postfix[0] == {"loss": f"{logged[0]['loss']:.3f}", "acc": f"{logged[0]['rewards/accuracies']:.3f}"}
    assert [b.desc for b in bars if b.desc != "dpo"] == ["dpo: reference log-probs"]


def test_running_figures_are_debiased_moving_averages():
    r = training.Running(decay=0.5)
    assert r.update(loss=2.0) == {"loss": "2.000"}  # the first step counts in full
    assert r.update(loss=2.0) == {"loss": "2.000"}
    assert r.update(loss=9.0) == {"loss": f"{(0.5 * 2 * 0.75 + 0.5 * 9.0) / (1 - 0.125):.3f}"}


def test_first_and_last_screens(run):
    out, screen, size = run
    assert "2 chunks of 32 preference pairs" in screen
    assert screens.chunk_sizes([[0] * 39, [0] * 38, [0] * 46]) == "38-46 (39, 38, 46)"
    assert f"disk        {human_size(size)} in {out}" in screen
    assert f"curves      python -m experiments.plots {out}  (draws {out / 'curves.png'})" in screen
    assert human_size(1536) == "1.5 KB" and human_size(999) == "999 B" and human_size(5.1 * 2 ** 30) == "5.1 GB"


def test_stage_checkpoints_keep_no_optimizer_moments(run):
    out, _, _ = run
    ckpt = load_checkpoint(str(out / "dpo.pt"))
    weights = sum(t.numel() * t.element_size() for t in ckpt["model"].values())
    assert "optimizer" not in ckpt and os.path.getsize(out / "dpo.pt") < 1.2 * weights  # AdamW's moments: 3x


# ---- experiments.plots ----------------------------------------------------------------------------

def test_a_run_drawn(run, tmp_path, capsys):
    extra("matplotlib", "matplotlib draws the curves")
    from experiments import plots
    out, _, _ = run
    plots.main([str(out), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {tmp_path / 'c.png'}\n"
    with pytest.raises(SystemExit) as e:
        plots.main([str(tmp_path)])
    msg = str(e.value)
    assert msg.startswith("python -m experiments.plots: error: RUN_DIR ") and "holds no metrics.jsonl" in msg


def test_plots_help_says_what_it_draws():
    import subprocess
    p = subprocess.run([sys.executable, "-m", "experiments.plots", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "run_dir" in p.stdout and "rewards/margins" in p.stdout


# ---- helpers ---------------------------------------------------------------------------------

def chat_model(tmp_path):
    """A tiny random Llama with a ChatML tokenizer and template, as a Hugging Face directory."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from chat_dirs import chat_tokenizer

    import hf
    from model import GPT, preset
    d = tmp_path / "chat"
    d.mkdir()
    vocab = chat_tokenizer(d, "chatml")
    torch.manual_seed(0)
    hf.save_pretrained(GPT(preset("tiny", vocab_size=vocab, model_type="llama", block_size=1024)), str(d),
                       tokenizer_dir=str(d))
    return d


"""End-to-end: the tiny pipeline, run in-process with reduced sizes."""
import json
import os
import re
import shlex

import pytest
import torch

import data
import inputs
import screens
import train
import training
from checkpoint import load_checkpoint, model_from_checkpoint
from runtime import compute_dtype
from sampler import generate
from sample import main as sample_main
from selm import win
from tasks import sorting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--n-sft", "1024", "--chunk-size", "128", "--n-eval", "64",
        "--sft-steps", "150", "--iterations", "2"]


def run(tmp_path, *extra):
    cfg = train.parse_args(FAST + ["--out-dir", str(tmp_path)] + list(extra))
    return train.run(cfg)


def test_tiny_pipeline_end_to_end(tmp_path, capsys):
    run(tmp_path)
    screens = capsys.readouterr().out
    on_disk = json.load(open(tmp_path / "results.json"))
    assert [r["stage"] for r in on_disk] == ["sft", "dpo", "selm_1", "selm_2"]
    for r in on_disk:
        for k in ("win_rate_vs_reference", "win_rate_vs_sft", "reward", "perfect"):
            assert 0.0 <= r[k] <= 1.0, (k, r)
        assert r["length"] > 0 and r["kl"] >= -1.0
    # "win vs SFT" is the model's greedy answers judged against the SFT model's, which every
    # checkpoint keeps: recompute both from the saved weights and compare with the last row
    cfg = inputs.resolve(train.parse_args(FAST))
    d, tok = inputs.load_data(cfg), inputs.tokenizer_for(cfg)
    prompt_ids = [tok.encode(e["prompt"]) for e in d.eval]

    def answers(stage):  # sampled in the run's dtype (--dtype auto: fp32 for a model this narrow)
        m = model_from_checkpoint(load_checkpoint(str(tmp_path / f"{stage}.pt")))
        dtype, _ = compute_dtype(torch.device("cpu"), "auto", m.config.n_embd)
        out, _ = generate(m, prompt_ids, cfg.max_new_tokens, temperature=0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          dtype=dtype)
        return [tok.decode([t for t in r if t != tok.eos_id]) for r in out]
    sft, last = answers("sft"), answers("selm_2")
    assert load_checkpoint(str(tmp_path / "selm_2.pt"))["sft_answers"] == sft
    wins = [win(*d.judge(e["prompt"], [a, s])) for e, a, s in zip(d.eval, last, sft)]
    assert on_disk[-1]["win_rate_vs_sft"] == sum(wins) / len(wins) != 0.5
    assert on_disk[-1]["reward"] > on_disk[0]["reward"], on_disk
    assert sorted(os.listdir(tmp_path)) == ["dpo.pt", "metrics.jsonl", "results.json",
                                            "selm_1.pt", "selm_2.pt", "sft.pt"]
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    pref = [r for r in rows if r.get("stage") == "selm_1" and "loss" in r]
    assert pref and {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                     "logps/chosen", "logps/rejected", "optimism"} <= set(pref[0])
    assert len([r for r in rows if "eval" in r]) == 4
    # the first screen: the model, the data, the stages, and only the settings that differ
    # from the defaults; the last: where things went, and a sample.py command that works
    first, last = screens.split("\n[    sft]")[0], screens.split("[ selm_2]")[1]
    assert "tiny:" in first and "1024 SFT demonstrations, 3 chunks of 128 preference pairs, 64 evaluation" in first
    assert "on cpu (float32: " in first  # which dtype, and why: auto gives a model 64 wide fp32 on any CPU
    assert "selm_1..selm_2" in first and "--beta" not in first
    assert "settings   --n-sft 1024 --chunk-size 128 --n-eval 64 --sft-steps 150 --iterations 2, the rest at" in first
    assert f"saved in {tmp_path}" in first
    assert str(tmp_path / "results.json") in last
    command = next(line for line in last.splitlines() if "python sample.py" in line)
    argv = shlex.split(command.split("python sample.py")[1])
    assert argv[:2] == ["--ckpt", str(tmp_path / "selm_2.pt")] and sorting.parse_prompt(f"sort: {argv[3]}\n")
    sample_main(argv)
    answer = capsys.readouterr().out
    assert answer.endswith("\n") and answer.count("\n") == 1 and not answer.startswith("'")  # plain text


def test_help_tells_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in out and "(default: )" not in out and not re.search(r"\(default[^)]*\) \(default", out)
    # the default run's value, then those of the recipes that change it (inputs.RECIPES): --alpha's, --sft-steps'
    assert "0 = iterative DPO (default: 0.001; --task instructions: 0.03)" in out
    assert "SFT optimizer steps (default: 1500; --model tiny: 800; --task instructions: 0)" in out


def test_the_config_shows_the_values_a_run_uses():
    """train.Config's defaults are the default run's: checking its settings fills in nothing but
    --max-new-tokens' stated rule. A recipe's defaults replace Config's for the flags not given
    only, a later row winning; the first screen counts them as defaults."""
    import dataclasses
    cfg = train.parse_args([])
    assert dataclasses.asdict(cfg) == {f.name: f.default for f in dataclasses.fields(train.Config)}
    inputs.check_config(cfg)
    assert {k for k, v in dataclasses.asdict(cfg).items() if v != getattr(train.Config, k)} == {"max_new_tokens"}
    assert cfg.max_new_tokens == cfg.max_len + 4
    both = train.parse_args(["--model", "tiny", "--task", "instructions", "--beta", "2.0"])
    assert (both.beta, both.lr, both.n_sft, both.chunk_size, both.sft_steps) == (2.0, 3e-5, 4096, 256, 0)
    assert screens.changed_settings(both) == "--model tiny --task instructions --beta 2.0"


def test_first_screen_settings_and_last_screen_prompt():
    """Only settings that differ from their defaults are named (a preset's own default is a
    default); the prompt sample.py is shown is the user's text, as its --prompt takes it."""
    cfg = inputs.resolve(train.parse_args(["--model", "tiny", "--n-sft", "4096", "--alpha", "0", "--compile"]))
    assert screens.changed_settings(cfg) == "--model tiny --alpha 0.0 --compile"  # 4096: tiny's n_sft anyway
    assert screens.changed_settings(cfg, leave_out=("model",)) == "--alpha 0.0 --compile"
    plain = lambda prompt, template="{prompt}", **kw: data.TrainingData(  # noqa: E731
        [], [[]], [{"prompt": prompt, "reference": None}], None, prompt_template=template, **kw)
    assert screens.example_prompt(plain("sort: dcba\n", "sort: {prompt}\n")) == "dcba"
    assert screens.example_prompt(plain("two words")) == "'two words'"
    for unwieldy in (plain("x" * 200), plain("a\nb"), plain("<|user|>hi", conversational=True)):
        assert screens.example_prompt(unwieldy) == "'your prompt'"
    from tokenizer import Templated
    one_turn = Templated("<|user|>Write a haiku.<|assistant|>", [{"role": "user", "content": "Write a haiku."}])
    assert screens.example_prompt(plain(one_turn, conversational=True)) == "'Write a haiku.'"  # what --prompt takes


def test_seeds_are_the_ones_runs_were_made_with():
    """Every run's results depend on these numbers: seed_for must keep them."""
    for seed in (0, 1, 7):
        for si in range(6):
            assert train.seed_for(seed, "stage", si) == train.seed_for(seed, "batches", si) == seed * 1000 + si
            for k in range(3):
                assert train.seed_for(seed, "y_ref", si, k) == seed * 1000 + si - 1 + 7 * k
        assert [train.seed_for(seed, "kl", k=k) for k in range(3)] == [seed * 7919 + 100_003 * k for k in range(3)]
        assert train.seed_for(seed, "init") == train.seed_for(seed, "sft_batches") == seed


@pytest.mark.parametrize("flags,msg", [
    (["--beta", "0"], "--beta must be positive"),
    (["--alpha", "-1"], "--alpha must be non-negative"),
    (["--model", "huge"], "--model must be one of tiny, small"),
    (["--batch-size", "10", "--micro-batch-size", "4"], "not a multiple"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr-decay", "0"], "--lr-decay must be positive"),
    (["--warmup", "2"], "--warmup must be a fraction of the steps, in [0, 1]"),
    (["--kl-samples", "-1"], "--kl-samples must be >= 0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),  # clipping to a negative norm reverses training
    (["--block-size", "-5"], "--block-size must be between 2 and"),
    (["--block-size", "1000000000"], "--block-size must be between 2 and"),  # not a 256 GB allocation
    (["--init-from", ROOT, "--block-size", "-3"], "--block-size must be between 2 and"),  # not the data's fault
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--n-sft", "0"], "--n-sft must be at least 1"),  # SFT on nothing, silently
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),  # not torch's words after SFT
    (["--init-from", os.path.join(ROOT, "README.md")], "README.md is not a directory"),
])
def test_bad_flags_are_one_line_errors(tmp_path, monkeypatch, flags, msg):
    monkeypatch.setattr(train, "setup", reached_setup)  # a flag that gets through fails here, untrained
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out-dir", str(tmp_path)] + flags)
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert not os.listdir(tmp_path)  # nothing written


def reached_setup(*args, **kw):
    raise AssertionError("the flags were accepted: the run reached setup()")


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out-dir", str(tmp_path), "--resume"])
    assert "no checkpoint" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "mps", "tpu9"])
def test_unavailable_device_is_one_line(tmp_path, device):
    if device == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out-dir", str(tmp_path), "--device", device])
    msg = str(e.value)
    assert f"--device {device}" in msg and "\n" not in msg
    assert ("not available in this PyTorch build" in msg and torch.__version__ in msg) or "not a device" in msg


def test_truncated_y_ref_keeps_no_eos(tmp_path, monkeypatch):
    """A y_ref cut off at --max-new-tokens is no finished answer: no EOS is appended to it,
    where it is the optimism term's sample or a member of the pair, and the log counts it."""
    import runtime
    from model import GPT, preset
    cfg = inputs.resolve(train.parse_args(FAST + ["--out-dir", str(tmp_path), "--max-new-tokens", "2"]))
    tok, d = inputs.tokenizer_for(cfg), inputs.load_data(cfg)
    rt = runtime.setup("cpu", "float32", str(tmp_path))
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size))
    seen = {}
    monkeypatch.setattr(train, "preference_epoch", lambda *a, **k: seen.setdefault("examples", a[5]) and None)
    chunk = d.chunks[1][:16]
    _, info = train.selm_iteration(rt, cfg, tok, 1, model, chunk, d.judge)
    assert info["y_ref_truncated"] == 16  # an untrained model never stops within 2 tokens
    for ex in seen["examples"]:
        (y,) = ex.y_refs  # one y_ref per example (m = 1)
        assert len(y) == 2 and y[-1] != tok.eos_id
        assert ex.chosen[-1] == tok.eos_id or ex.chosen == y  # an offline response ends in EOS; y_ref as sampled
        assert ex.rejected[-1] == tok.eos_id or ex.rejected == y


def test_sft_without_demonstrations_keeps_the_weights(tmp_path):
    """--init-from weights with --prefs but no --sft: the SFT stage has nothing to train on,
    which must leave the model as it is (it used to fail on max() of an empty list)."""
    import runtime
    from model import GPT, preset
    cfg = inputs.resolve(train.parse_args(FAST + ["--out-dir", str(tmp_path), "--sft-steps", "0"]))
    model = GPT(preset("tiny", vocab_size=300))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = runtime.setup("cpu", "float32", str(tmp_path))
    assert training.train_sft(rt, cfg, inputs.tokenizer_for(cfg), model, [], seed=0) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_online_step_options(tmp_path, monkeypatch):
    """--y-ref sampled, --online-samples n, --optimism-samples m, --tie-order: how many of
    pi_ref's answers reach the judge and the optimism term, and that they are samples."""
    import runtime
    from model import GPT, preset
    cfg = train.parse_args(FAST + ["--out-dir", str(tmp_path), "--y-ref", "sampled", "--online-samples", "3",
                                   "--optimism-samples", "2", "--tie-order", "authors", "--max-new-tokens", "6"])
    inputs.check_config(cfg)
    tok, d = inputs.tokenizer_for(cfg), inputs.load_data(cfg)
    rt = runtime.setup("cpu", "float32", str(tmp_path))
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size))
    seen = {"candidates": []}
    judge = d.judge
    def spy(prompt, candidates):
        seen["candidates"].append(candidates)
        return judge(prompt, candidates)
    monkeypatch.setattr(train, "preference_epoch", lambda *a, **k: seen.setdefault("examples", a[5]) and None)
    chunk = d.chunks[1][:16]
    train.selm_iteration(rt, cfg, tok, 1, model, chunk, spy)
    assert all(len(c) == 5 for c in seen["candidates"])  # the offline pair and n = 3 answers of pi_ref
    assert [c[3] for c in seen["candidates"]] == [e["chosen"] for e in chunk]  # authors: [y_1..y_n, chosen, rejected]
    assert any(len(set(c[:3])) > 1 for c in seen["candidates"])  # sampled answers differ
    assert all(len(ex.y_refs) == 2 for ex in seen["examples"])  # m = 2 answers for the optimism term
    greedy = train.parse_args(FAST + ["--out-dir", str(tmp_path), "--online-samples", "3"])  # greedy y_ref, 2 samples
    inputs.check_config(greedy)
    answers = train.reference_answers(rt, greedy, tok, model, [tok.encode_prompt(e["prompt"]) for e in chunk], 2)
    assert [a[0] for a in answers] == train.sample_responses(rt, greedy, tok, model, [tok.encode_prompt(e["prompt"])
                                                                                       for e in chunk])
    # the n answers of a prompt share its prefill, and answer j is what a call with its seed alone samples
    ids = [tok.encode_prompt(e["prompt"]) for e in chunk]
    alone = [train.sample_responses(rt, cfg, tok, model, ids, cfg.temperature, train.seed_for(cfg.seed, "y_ref", 2, j))
             for j in range(3)]
    assert [c[:3] for c in seen["candidates"]] == [[tok.decode(r[:-1] if r[-1] == tok.eos_id else r) for r in rs]
                                                    for rs in zip(*alone)]


def test_m_optimism_samples_average_in_the_loss(tmp_path):
    """The optimism term with m samples is alpha*beta*(mean log pi - mean log pi_ref): one
    training run with m = 2 logs the optimism term of exactly that."""
    out = train.run(train.parse_args(FAST + ["--out-dir", str(tmp_path), "--iterations", "1", "--y-ref", "sampled",
                                             "--optimism-samples", "2", "--alpha", "0.1", "--sft-steps", "10",
                                             "--n-eval", "16"]))
    assert [r["stage"] for r in out] == ["sft", "dpo", "selm_1"]
    rows = [r for r in runtime_rows(tmp_path) if r.get("stage") == "selm_1" and "optimism" in r]
    assert rows and abs(rows[0]["optimism"]) < 1e-6 and any(abs(r["optimism"]) > 1e-4 for r in rows)  # 0 at pi = pi_ref


def test_online_samples_0_is_offline_dpo_with_the_moving_reference(tmp_path, monkeypatch):
    """--online-samples 0 --alpha 0: an iteration samples and judges nothing, and trains on its
    chunk's offline pairs as they are, with as many optimizer steps as the online arms take."""
    import runtime
    from model import GPT, preset
    cfg = train.parse_args(FAST + ["--out-dir", str(tmp_path), "--online-samples", "0", "--alpha", "0"])
    inputs.check_config(cfg)
    tok, d = inputs.tokenizer_for(cfg), inputs.load_data(cfg)
    rt = runtime.setup("cpu", "float32", str(tmp_path))
    model = GPT(preset("tiny", vocab_size=tok.vocab_size))
    seen = {}
    monkeypatch.setattr(train, "preference_epoch", lambda *a, **k: seen.update(examples=a[5], alpha=a[8]))
    monkeypatch.setattr(train, "sample_responses", lambda *a, **k: pytest.fail("--online-samples 0 sampled"))
    chunk = d.chunks[1][:16]
    _, info = train.selm_iteration(rt, cfg, tok, 1, model, chunk, lambda p, c: pytest.fail("it judged"))
    assert info["pairs"] == 16 and "t_sample" not in info and seen["alpha"] == 0.0
    assert [(ex.chosen, ex.rejected, ex.y_refs) for ex in seen["examples"]] == [
        (tok.encode_response(e["chosen"]), tok.encode_response(e["rejected"]), ()) for e in chunk]


def test_a_run_with_online_samples_0_goes_through_every_stage(tmp_path):
    out = train.run(train.parse_args(FAST + ["--out-dir", str(tmp_path), "--iterations", "1", "--online-samples", "0",
                                             "--alpha", "0", "--sft-steps", "10", "--n-eval", "16"]))
    assert [r["stage"] for r in out] == ["sft", "dpo", "selm_1"]
    online = [r["online"] for r in runtime_rows(tmp_path) if "online" in r]
    assert online and online[0]["pairs"] > 0 and "t_sample" not in online[0]


def test_missing_eos_penalty_ranks_every_cut_off_answer_last(tmp_path, monkeypatch):
    """Answers of 2 tokens are all cut off: with --missing-eos-penalty 1 no y_ref becomes chosen
    (each offline answer ended), and the record counts the penalised candidates; without it, the
    judge alone ranks them and some cut-off y_ref that happens to score high is chosen."""
    import runtime
    from model import GPT, preset
    chosen = {}
    for penalty in ("0", "1"):
        cfg = train.parse_args(FAST + ["--out-dir", str(tmp_path), "--max-new-tokens", "2",
                                       "--missing-eos-penalty", penalty])
        inputs.check_config(cfg)
        tok, d = inputs.tokenizer_for(cfg), inputs.load_data(cfg)
        rt = runtime.setup("cpu", "float32", str(tmp_path))
        torch.manual_seed(0)
        model = GPT(preset("tiny", vocab_size=tok.vocab_size))
        monkeypatch.setattr(train, "preference_epoch", lambda *a, **k: None)
        chunk = d.chunks[1][:32]
        offline = [(e["chosen"], e["rejected"]) for e in chunk]
        judge = lambda prompt, cands: [1.0 if c not in ("",) and all(c != o for pair in offline for o in pair)  # noqa: E731
                                       else 0.5 for c in cands]  # a judge that prefers anything new
        _, info = train.selm_iteration(rt, cfg, tok, 1, model, chunk, judge)
        chosen[penalty] = info["y_ref_chosen"]
        assert info["penalised"] == (32 if penalty == "1" else 0)  # y_ref cut off; the offline answers ended
    assert chosen["0"] > 0 and chosen["1"] == 0


def runtime_rows(out):
    import runtime
    return runtime.read_metrics(os.path.join(out, "metrics.jsonl"))


@pytest.mark.parametrize("flags,msg", [
    (["--optimism-samples", "2"], "needs --y-ref sampled"),
    (["--y-ref", "beam"], "--y-ref must be greedy or sampled"),
    (["--tie-order", "random"], "--tie-order must be"),
    (["--online-samples", "-1"], "--online-samples must be >= 0"),
    (["--online-samples", "0", "--alpha", "0.1"], "give --alpha 0 as well"),
    (["--missing-eos-penalty", "-1"], "--missing-eos-penalty must be >= 0"),
    (["--sft-passes", "3,1"], "--sft-passes must be lo,hi"),
    (["--offline-passes", "x"], "--offline-passes must be lo,hi"),
    (["--export", "selm_9"], "selm_9 is no stage"),
])
def test_bad_online_flags_are_one_line_errors(tmp_path, flags, msg):
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out-dir", str(tmp_path)] + flags)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_task_difficulty_knobs_change_the_data():
    easy = inputs.load_data(inputs.resolve(train.parse_args(FAST + ["--sft-passes", "4,6", "--offline-passes", "3,6"])))
    base = inputs.load_data(inputs.resolve(train.parse_args(FAST)))
    reward = lambda rows: sum(sorting.reward(p, r) for p, r in rows) / len(rows)  # noqa: E731
    assert reward(easy.sft) > reward(base.sft) + 0.1
    chosen = lambda d: [(e["prompt"], e["chosen"]) for c in d.chunks for e in c]  # noqa: E731
    assert reward(chosen(easy)) > reward(chosen(base))


def test_adamw_is_fused_under_autocast_and_plain_in_fp32():
    """The fused AdamW under autocast (one pass over the weights: 5x faster on a CPU); a fp32 run
    keeps the plain one, whose rounding earlier runs' numbers came from. Both take the same step
    up to float rounding."""
    import runtime
    from model import GPT, preset
    steps = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        m = GPT(preset("tiny", vocab_size=61))
        opt = training.adamw(m.parameters(), runtime.setup("cpu", dtype, "unused"), lr=1e-2, weight_decay=0.1)
        assert bool(opt.defaults["fused"]) == (dtype == "bfloat16")
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        steps[dtype] = torch.cat([p.detach().flatten() for p in m.parameters()])
    torch.testing.assert_close(steps["bfloat16"], steps["float32"], rtol=0, atol=1e-6)


def test_dtype_auto_weighs_the_hardware_and_the_width(monkeypatch):
    """--dtype auto on a CPU: bf16 autocast where torch reports bf16 matrix units and the model is
    wide enough to gain; fp32 otherwise, and where the check is unavailable. Each with its reason."""
    import runtime
    cpu = torch.device("cpu")
    assert runtime.compute_dtype(cpu, "float32", 1024) == (None, "--dtype float32")
    assert runtime.compute_dtype(cpu, "bfloat16", 64)[0] == torch.bfloat16  # asked for: as asked
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: ["AMX-BF16"])
    assert runtime.compute_dtype(cpu, "auto", 576) == (torch.bfloat16, "this CPU has AMX-BF16")
    assert runtime.compute_dtype(cpu, "auto") == (torch.bfloat16, "this CPU has AMX-BF16")  # width not known yet
    dtype, why = runtime.compute_dtype(cpu, "auto", 128)
    assert dtype is None and "128 wide runs faster in fp32" in why
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: [])
    dtype, why = runtime.compute_dtype(cpu, "auto", 576)
    assert dtype is None and "no bf16 matrix unit" in why
    monkeypatch.undo()
    monkeypatch.delattr(torch._C._cpu, "_get_cpu_capability")  # another torch: the private check is gone
    assert runtime.cpu_bf16_units() == [] and runtime.compute_dtype(cpu, "auto", 576)[0] is None


def test_micro_batches_accumulate_to_the_same_steps(tmp_path):
    """--micro-batch-size only splits each step's forward: in fp32 a run in micro-batches of 4
    trains the weights that one forward of the whole batch of 16 trains. (bf16 autocast rounds
    each forward's sums by its shapes, so there the runs part after a few steps.) It fails when
    a micro-batch's gradient is lost; a loss off by a constant factor would pass, as AdamW's
    step does not see the scale."""
    weights = {}
    for micro in (16, 4):
        out = tmp_path / str(micro)
        run(out, "--sft-steps", "30", "--iterations", "1", "--batch-size", "16", "--micro-batch-size", str(micro),
            "--dtype", "float32")
        weights[micro] = load_checkpoint(out / "selm_1.pt")["model"]
    assert weights[16].keys() == weights[4].keys()
    moved = load_checkpoint(tmp_path / "16" / "dpo.pt")["model"]
    assert any(not torch.equal(moved[k], weights[16][k]) for k in moved)  # the iteration trained
    for k in weights[16]:
        torch.testing.assert_close(weights[4][k], weights[16][k], rtol=1e-4, atol=1e-5, msg=k)

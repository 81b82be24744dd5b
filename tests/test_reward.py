"""`--judge rm:DIR` (reward.py): a *ForSequenceClassification directory scored by selm's own
model code, against transformers on random weights and a ragged batch; the directories it
refuses; and the paper's loop end to end on conversations, a chat model and a reward model."""

import json
import os

import pytest
import torch

import chat
import data
import hf
import inputs
import reward
import sample
import tokenizer
import train
from chat_dirs import chat_tokenizer
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import extra

transformers = extra("transformers", "interop test")
extra("tokenizers", "interop test")
extra("jinja2", "interop test")
extra("safetensors", "interop test")

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
# family -> (its config, the tokenizer kind, whether the directory has a chat template)
HEADS = {
    "gpt2": (lambda V: transformers.GPT2Config(vocab_size=V, n_positions=256, n_embd=32, n_layer=2, n_head=2),
             "chatml", False),
    "llama": (lambda V: transformers.LlamaConfig(vocab_size=V, **TINY), "llama3", True),
    "qwen2": (lambda V: transformers.Qwen2Config(vocab_size=V, **TINY, tie_word_embeddings=True), "chatml", True),
    "qwen3": (lambda V: transformers.Qwen3Config(vocab_size=V, **TINY, head_dim=16), "llama3", False),  # BOS, no template
}
PAD = {"chatml": "<|endoftext|>", "llama3": "<|end_of_text|>"}  # in no text below


def reward_dir(path, family, seed=0):
    """A random *ForSequenceClassification of `family` with one output, saved with a tokenizer;
    every parameter moved off its init (a zero bias would hide a mis-mapped tensor)."""
    make, kind, template = HEADS[family]
    V = chat_tokenizer(path, kind, template)
    config = make(V)
    config.num_labels = 1
    config.pad_token_id = tokenizer.get_tokenizer(str(path), verbose=False).enc.encode_single_token(PAD[kind])
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", HEADS)
def test_rewards_equal_transformers(tmp_path, family):
    hf_model = reward_dir(tmp_path / "rm", family)
    judge = inputs.load_judge(f"rm:{tmp_path / 'rm'}")
    judge.batch_tokens = 200  # a few ragged batches of the length-sorted sequences
    # prompts as a chat run has them (rendered by the policy's template, with their messages) and plain ones
    chat_tokenizer(tmp_path / "policy", "chatml")
    template = chat.load_template(tokenizer.get_tokenizer(str(tmp_path / "policy"), verbose=False))
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say a:"}],
             [{"role": "user", "content": "the quick brown fox jumps over the lazy dog, twice"}]]
    prompts = [template.prompt(c) for c in convs] + ["say b:"]
    cands = [["aaaa", "b", "a long answer in French: bonjour le monde"], [" x "], ["bbbb", ""]]
    ours = judge.batch(prompts, cands)
    assert [len(s) for s in ours] == [3, 1, 2] and judge(prompts[0], cands[0]) == pytest.approx(ours[0], abs=1e-6)
    # the ids transformers would score: the reward model's template over the conversation, or its
    # tokenizer over prompt text + response text
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm")
    seqs = []
    for p, cs in zip(prompts, cands):
        for c in cs:
            if HEADS[family][2]:
                msgs = getattr(p, "messages", None) or [{"role": "user", "content": p}]
                ids = hf_tok.apply_chat_template(msgs + [{"role": "assistant", "content": c}], return_dict=True)
            else:
                ids = hf_tok(str(p) + c)
            seqs.append(ids["input_ids"])
    assert seqs == [judge.encode(p, c) for p, cs in zip(prompts, cands) for c in cs]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [hf_model.config.pad_token_id] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(torch.tensor([r for rs in ours for r in rs]), theirs, atol=1e-4, rtol=0)


def test_directories_that_are_no_reward_model(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    for spec, msg in [(f"rm:{lm}", "is not a sequence classifier"), (f"rm:{tmp_path / 'nowhere'}", "no config.json")]:
        with pytest.raises(data.DataError) as e:
            inputs.load_judge(spec)
        assert msg in str(e.value) and spec in str(e.value) and "\n" not in str(e.value)
    # two outputs: a classifier, not a reward model
    chat_tokenizer(tmp_path / "two", "chatml", False)
    config = transformers.Qwen2Config(vocab_size=303, **TINY, num_labels=2)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "two")
    with pytest.raises(data.DataError, match=r"score.weight of shape \(2, 32\); a reward model's head is one output"):
        inputs.load_judge(f"rm:{tmp_path / 'two'}")


def test_a_sequence_longer_than_the_reward_models_context_is_a_judge_error(tmp_path):
    reward_dir(tmp_path / "rm", "qwen2")
    judge = inputs.load_judge(f"rm:{tmp_path / 'rm'}")
    with pytest.raises(data.JudgeError) as e:
        data.judge_block(judge, [("say a:", ["aaaa"]), ("say b:", ["b" * 3000])])
    msg = str(e.value)
    assert f"judge rm:{tmp_path / 'rm'}" in msg and "longer than the reward model's context of 256" in msg, msg
    assert "'say b:'" in msg and "\n" not in msg


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_not_a_classifier_stops_the_run_in_one_line(tmp_path):
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    tok = tmp_path / "tok"
    chat_tokenizer(tok, "chatml")
    conv = [{"role": "user", "content": "say a:"}, {"role": "assistant", "content": "aaaa"}]
    prefs = write(tmp_path / "prefs.jsonl", [{"chosen": conv, "rejected": conv[:1] + [{"role": "assistant",
                                                                                       "content": "x"}]}])
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "tiny", "--bpe-path", str(tok), "--block-size", "128", "--sft-steps", "0",
                    "--init-from", str(lm), "--prefs", prefs, "--prompts", write(tmp_path / "p.jsonl", [{"prompt": "hi"}]),
                    "--judge", f"rm:{lm}", "--iterations", "0", "--out-dir", str(tmp_path / "out")])
    assert "is not a sequence classifier" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out" / "sft.pt")


def test_the_papers_loop_on_conversations_with_a_reward_model(tmp_path, capsys):
    """A 2-layer random Qwen2 chat model (ChatML template) and a 2-layer random Qwen2 reward
    model; ultrafeedback_binarized-shaped preferences and conversational prompts with
    references; --judge rm:DIR through train.run. The evaluation's reward is the reward
    model's mean score of the greedy answers."""
    policy = tmp_path / "policy"
    V = chat_tokenizer(policy, "chatml")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=V, **TINY, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(policy)
    reward_dir(tmp_path / "rm", "qwen2", seed=1)
    letters = "abcdefgh"

    def conv(c, answer):
        return [{"role": "user", "content": f"say {c}:"}, {"role": "assistant", "content": answer}]
    prefs = [{"prompt": f"say {c}:", "prompt_id": str(i), "chosen": conv(c, c * 4), "rejected": conv(c, "xyz"),
              "messages": conv(c, c * 4), "score_chosen": 9.0, "score_rejected": 2.0} for i, c in enumerate(letters * 2)]
    prompts = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"say {c}:"}],
                "reference": c * 2} for c in letters[:4]]
    out = tmp_path / "out"
    flags = ["--init-from", str(policy), "--block-size", "128", "--sft-steps", "0", "--iterations", "1",
             "--prefs", write(tmp_path / "prefs.jsonl", prefs), "--prompts", write(tmp_path / "prompts.jsonl", prompts),
             "--judge", f"rm:{tmp_path / 'rm'}", "--batch-size", "4", "--micro-batch-size", "4",
             "--max-new-tokens", "6", "--lr", "1e-3", "--kl-samples", "0", "--out-dir", str(out)]
    results = train.run(train.parse_args(flags))
    assert [r["stage"] for r in results] == ["sft", "dpo", "selm_1"]
    assert json.load(open(out / "results.json")) == results
    for r in results:
        assert 0 <= r["win_rate_vs_reference"] <= 1 and 0 <= r["win_rate_vs_sft"] <= 1 and r["perfect"] is None
    online = [json.loads(line)["online"] for line in open(out / "metrics.jsonl") if '"online"' in line]
    assert online and online[0]["pairs"] + online[0]["dropped_ties"] == 8
    # "reward" is the mean reward of the greedy answers: the SFT stage's, scored again here
    tok = tokenizer.get_tokenizer(str(policy), verbose=False)
    d = data.load_user_data(None, str(tmp_path / "prefs.jsonl"), str(tmp_path / "prompts.jsonl"), 2,
                            chat.load_template(tok))
    judge = inputs.load_judge(f"rm:{tmp_path / 'rm'}")
    assert isinstance(judge, reward.RewardJudge)
    answers = load_checkpoint(str(out / "selm_1.pt"))["sft_answers"]
    scores = [judge(e["prompt"], [a])[0] for e, a in zip(d.eval, answers)]
    assert results[0]["reward"] == pytest.approx(sum(scores) / len(scores), abs=1e-3)  # a GPU run: TF32
    # sample.py writes its prompt as training did: a user turn in the chat template
    ckpt = load_checkpoint(str(out / "selm_1.pt"))
    prompt = chat.load_template(tok).prompt([{"role": "user", "content": "say c:"}])
    assert prompt.endswith("<|im_start|>user\nsay c:<|im_end|>\n<|im_start|>assistant\n")
    loaded = hf.load_model(str(out / "selm_1.pt"))
    assert loaded.conversational and loaded.prompt("say c:") == prompt
    model = model_from_checkpoint(ckpt, str(out / "selm_1.pt"))
    r, _ = sample.generate(model, [tok.encode_prompt(prompt)], 6, temperature=0, eos_id=tok.eos_ids, pad_id=tok.pad_id)
    capsys.readouterr()
    sample.main(["--ckpt", str(out / "selm_1.pt"), "--prompt", "say c:", "--temperature", "0", "--max-new-tokens", "6"])
    assert capsys.readouterr().out == tok.decode([t for t in r[0] if t not in tok.eos_ids]) + "\n"  # plain text

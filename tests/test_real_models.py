"""The whole pipeline from a Hugging Face directory, as a user with a real checkpoint on disk
would run it: a 2-layer random Llama-shaped model and a Qwen2-shaped one, each with a
byte-level BPE tokenizer.json trained here, through --init-from, --prefs, --prompts and
--judge, ending in --export directories that transformers loads with the same logits."""

import json
import os

import pytest
import torch

import train
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import extra

transformers = extra("transformers", "interop test")
tokenizers = extra("tokenizers", "interop test")
extra("safetensors", "interop test")

JUDGE = '''
def judge(prompt, candidates):
    want = prompt.strip()[-2]  # "say c:" -> the more c's the better
    return [c.count(want) / max(1, len(c)) for c in candidates]
'''
CORPUS = ["say a: aaaa", "say b: bbbb", "the quick brown fox", "<|im_start|>user\nhi<|im_end|>"] * 50


def tokenizer_dir(path):
    """A Qwen2-style byte-level BPE (its specials after the merges, <|im_end|> the EOS)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return tok.get_vocab_size()


FAMILIES = {
    "llama": lambda V: transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": lambda V: transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                                tie_word_embeddings=True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_from_a_hugging_face_directory_to_an_export(tmp_path, family):
    src = tmp_path / "model"
    V = tokenizer_dir(src)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(FAMILIES[family](V)).save_pretrained(src)
    letters = "abcdefgh"
    rows = {"prefs": [{"prompt": f"say {c}:", "chosen": c * 4, "rejected": "xyz"} for c in letters * 3],
            "prompts": [{"prompt": f"say {c}:", "reference": c} for c in letters]}
    for name, rs in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    (tmp_path / "judge.py").write_text(JUDGE)
    out = tmp_path / "out"
    results = train.run(train.parse_args([
        "--init-from", str(src), "--block-size", "64", "--sft-steps", "0", "--iterations", "2",
        "--prefs", str(tmp_path / "prefs.jsonl"), "--prompts", str(tmp_path / "prompts.jsonl"),
        "--judge", f"{tmp_path / 'judge.py'}:judge", "--batch-size", "8", "--micro-batch-size", "4",
        "--max-new-tokens", "6", "--lr", "1e-3", "--export", "dpo,selm_2", "--out-dir", str(out)]))
    assert [r["stage"] for r in results] == ["sft", "dpo", "selm_1", "selm_2"]
    ck = load_checkpoint(str(out / "selm_2.pt"))
    assert ck["tokenizer"] == {"name": "model", "source": str(src)}
    assert sorted(p for p in os.listdir(out) if p.startswith("hf-")) == ["hf-dpo", "hf-selm_2"]
    # the export: transformers loads it, with the run's weights and the source's tokenizer
    ours = model_from_checkpoint(ck).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "hf-selm_2").eval()
    assert type(theirs).__name__.lower() == f"{family}forcausallm"
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = theirs(ids).logits
        torch.testing.assert_close(exported, ours(ids), atol=1e-4, rtol=0)
        before = transformers.AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
    assert (exported - before).abs().max() > 1e-3  # the exported weights are the trained ones
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "hf-selm_2")
    assert hf_tok("say a: aaaa")["input_ids"] == tokenizers.Tokenizer.from_file(str(src / "tokenizer.json")).encode(
        "say a: aaaa").ids

"""tokenizer_json.py's tokenizer.json support, checked id for id against the `tokenizers` library
on byte-level BPE tokenizers trained here (nothing is downloaded). tests/test_real_chat.py
checks the same on a published vocabulary, SmolLM2's."""

import json

import pytest

import tokenizer
from conftest import extra
from texts import NOT_NFC, RARE_BYTES, TEXTS, assert_same_ids, random_texts

tokenizers = extra("tokenizers", "these tests compare against the tokenizers package")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

# Qwen2's pre-tokenization split (Llama-3's, but with \p{N} one digit at a time)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 1234567 foxes!",
    "Don't stop   believing -- hold on to that feeling.\n\n\tIndented\tline\r\nwindows line",
    "héllo wörld, naïve café; 日本語のテキスト、中文文本。 Ελληνικά κείμενα. русский текст",
    "emoji 🙂🙃 and symbols ©®™ ² ³ ٣ ½ plus numbers 3.14159 and 1,000,000 and 0x1F",
    "def f(x):\n    return x ** 2  # squares\n\nfor i in range(10):\n    print(i)\n",
    "sort: dbca\nabcd\nsort: hgfe\nefgh\n" * 3,
    "THE QUICK BROWN FOX. the quick brown fox. The Quick Brown Fox's tail.",
] * 20

def train(pre, tmp_path, name, specials_last=False, added=(), every_byte=True, normalizer=None):
    """Train a byte-level BPE tokenizer on CORPUS and save it as a Hugging Face directory.
    every_byte=False: the vocabulary holds only the bytes the corpus has."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  special_tokens=[] if specials_last else SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if every_byte else [])
    tok.train_from_iterator(CORPUS, trainer)
    if specials_last:  # Qwen-style: the specials after the merges
        tok.add_special_tokens(SPECIALS)
    tok.add_tokens(list(added))  # non-special added tokens: matched even in plain text
    d = tmp_path / name
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return tok, d


def write_configs(d, tokenizer_config, generation_config=None):
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if generation_config is not None:
        (d / "generation_config.json").write_text(json.dumps(generation_config))


def qwen2_style(tmp_path):  # with Qwen2's NFC normalizer
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return train(pre, tmp_path, "qwen2-style", specials_last=True, added=["<tool_call>"], normalizer=normalizers.NFC())


def gpt2_style(tmp_path):
    return train(pre_tokenizers.ByteLevel(add_prefix_space=False), tmp_path, "gpt2-style")


def smollm2_style(tmp_path, every_byte=True):
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return train(pre, tmp_path, "smollm2-style", every_byte=every_byte)


@pytest.mark.parametrize("style", [qwen2_style, gpt2_style, smollm2_style])
def test_same_ids_as_tokenizers_library(style, tmp_path):
    hf, d = style(tmp_path)
    write_configs(d, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    ours = tokenizer.get_tokenizer(str(d), verbose=False)
    assert ours.vocab_size == hf.get_vocab_size()
    assert len(hf.get_vocab()) > 450  # the training really merged
    texts = TEXTS + [t + " <tool_call>x</tool_call>" for t in TEXTS[:2]] + CORPUS[:7] + NOT_NFC
    assert_same_ids(hf, ours, texts)
    for text in TEXTS:  # a vocabulary of every byte gives the text back as it was (NFC here)
        assert ours.decode(ours.encode(text)) == text
    # plain text keeps special-token text as text; allow_special turns it into the id
    im_end = hf.token_to_id("<|im_end|>")
    assert im_end not in ours.encode("a<|im_end|>b")
    assert ours.encode("a<|im_end|>b", allow_special=True).count(im_end) == 1
    assert (ours.name, ours.source, ours.bos_id) == (d.name, str(d), None)


@pytest.mark.parametrize("unk", [None, "fused", "one per byte"])
def test_a_vocabulary_that_lacks_bytes_encodes_as_tokenizers_does(unk, tmp_path):
    """tokenizers drops a byte its vocabulary lacks (or writes the unk token, if the model names
    one) after splitting the text; what is left of the piece merges across the gap."""
    hf, d = smollm2_style(tmp_path, every_byte=False)
    if unk is not None:
        edited(d, lambda tj: tj["model"].update(unk_token="<|endoftext|>", fuse_unk=unk == "fused"))
        hf = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    write_configs(d, {"eos_token": "<|im_end|>"})
    ours = tokenizer.get_tokenizer(str(d), verbose=False)
    lacking = ours.irregular.missing
    assert len(lacking) > 100 and 4 in lacking  # the corpus holds few of the 256 bytes
    assert_same_ids(hf, ours, TEXTS + RARE_BYTES + random_texts(300))
    dropped = ours.encode("!\x04!")
    assert dropped == hf.encode("!!").ids if unk is None else hf.token_to_id("<|endoftext|>") in dropped


def test_no_text_makes_the_encoder_panic(tmp_path):
    """tiktoken panics (a BaseException) on a byte its ranks lack; every text encodes here,
    lone surrogates included (mended as tiktoken mends them)."""
    hf, d = smollm2_style(tmp_path, every_byte=False)
    write_configs(d, {"eos_token": "<|im_end|>"})
    ours = tokenizer.get_tokenizer(str(d), verbose=False)
    texts = ["".join(map(chr, range(i, i + 64))) for i in range(0, 0x3000, 64)] + ["\ud800 lone", "\udfff"]
    for text in texts:
        ours.encode(text), ours.encode(text, allow_special=True)


def test_bos_from_a_template_post_processor(tmp_path):
    from tokenizers import processors
    hf, d = qwen2_style(tmp_path)
    start = hf.token_to_id("<|im_start|>")  # stands in for Llama-3's <|begin_of_text|>
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", start)])])
    hf.save(str(d / "tokenizer.json"))
    write_configs(d, {"eos_token": "<|im_end|>"})
    ours = tokenizer.get_tokenizer(str(d), verbose=False)
    assert ours.bos_id == start
    text = "hello world"
    assert [ours.bos_id] + ours.encode(text) == hf.encode(text).ids  # Hugging Face adds it by default


def test_eos_and_pad_from_the_config_files(tmp_path):
    hf, d = qwen2_style(tmp_path)
    ids = {s: hf.token_to_id(s) for s in SPECIALS}
    # a chat model: ends its turn with <|im_end|>; generation also stops on <|endoftext|>
    write_configs(d, {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"},
                  {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
    t = tokenizer.get_tokenizer(str(d), verbose=False)
    assert t.eos_id == ids["<|im_end|>"] and t.pad_id == ids["<|endoftext|>"]
    assert t.eos_ids == {ids["<|im_end|>"], ids["<|endoftext|>"]}
    # no tokenizer_config: the first listed id; no pad token: padding with EOS
    (d / "tokenizer_config.json").unlink()
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|endoftext|>"]}))
    t = tokenizer.get_tokenizer(str(d), verbose=False)
    assert (t.eos_id, t.pad_id, t.eos_ids) == (ids["<|endoftext|>"],) * 2 + ({ids["<|endoftext|>"]},)
    (d / "generation_config.json").unlink()
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        tokenizer.get_tokenizer(str(d), verbose=False)
    write_configs(d, {"eos_token": "<|not_a_token|>"})
    with pytest.raises(ValueError, match="not one token"):
        tokenizer.get_tokenizer(str(d), verbose=False)


def edited(d, edit):
    tj = json.loads((d / "tokenizer.json").read_text())
    edit(tj)
    (d / "tokenizer.json").write_text(json.dumps(tj))


def test_tokenizers_tiktoken_cannot_reproduce_are_clear_errors(tmp_path):
    hf, d = gpt2_style(tmp_path)
    write_configs(d, {"eos_token": "<|endoftext|>"})
    original = (d / "tokenizer.json").read_text()

    def expect(edit, match):
        (d / "tokenizer.json").write_text(original)
        edited(d, edit)
        with pytest.raises(ValueError, match=match) as e:
            tokenizer.get_tokenizer(str(d), verbose=False)
        assert "\n" not in str(e.value)

    def swap_ids(tj):  # two merged tokens trade ids: id order is no longer merge order
        merges, vocab = tj["model"]["merges"], tj["model"]["vocab"]
        a, b = ("".join(m.split(" ")) if isinstance(m, str) else "".join(m) for m in (merges[10], merges[200]))
        vocab[a], vocab[b] = vocab[b], vocab[a]

    expect(swap_ids, "not in merge order")
    expect(lambda tj: tj.update(normalizer={"type": "NFKC"}), "normalizer NFKC")
    nfc_lower = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
    expect(lambda tj: tj.update(normalizer=nfc_lower), "normalizer NFC [+] Lowercase")
    expect(lambda tj: tj.update(decoder={"type": "Metaspace"}), "decoder other than ByteLevel")
    expect(lambda tj: tj.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "pre-tokenizer Metaspace")
    expect(lambda tj: tj["model"].update(type="Unigram"), "Unigram model")
    expect(lambda tj: tj["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer ByteLevel")
    expect(lambda tj: tj["added_tokens"][0].update(lstrip=True), "strips whitespace")
    expect(lambda tj: tj["model"]["merges"].pop(), "made by no merge")
    expect(lambda tj: tj["added_tokens"].append(dict(tj["added_tokens"][0], id=699, content="<|endoftext|>x")),
           "prefix")


def test_rules_a_published_file_may_break_are_kept_only_where_they_matter(tmp_path):
    """byte_fallback and the unk token act only on bytes the vocabulary lacks: with all 256 they
    change nothing and load; without, byte_fallback (<0x..> tokens) and an unk token that is
    not in the vocabulary are errors."""
    hf, d = gpt2_style(tmp_path)
    write_configs(d, {"eos_token": "<|endoftext|>"})
    edited(d, lambda tj: tj["model"].update(byte_fallback=True, unk_token="<|none|>"))
    assert tokenizer.get_tokenizer(str(d), verbose=False).irregular is None
    hf, d = smollm2_style(tmp_path, every_byte=False)
    write_configs(d, {"eos_token": "<|endoftext|>"})
    original = (d / "tokenizer.json").read_text()
    for change, match in [(dict(byte_fallback=True), "byte_fallback"), (dict(unk_token="<|none|>"), "unk token")]:
        (d / "tokenizer.json").write_text(original)
        edited(d, lambda tj: tj["model"].update(change))
        with pytest.raises(ValueError, match=match):
            tokenizer.get_tokenizer(str(d), verbose=False)


def test_directory_without_tokenizer_files_names_them(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json.*merges.txt"):
        tokenizer.get_tokenizer(str(tmp_path), verbose=False)

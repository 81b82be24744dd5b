"""Texts that try a tokenizer where tokenizers differ: Unicode, digits, whitespace runs, chat
markup, text that NFC changes, bytes that vocabularies lack; and the check that selm's
tokenizer encodes them as the `tokenizers` library does."""

import random

TEXTS = [
    "The quick brown fox's 12345 jumps; naïve café 日本語 🙂!",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\nline five\r\n\ttabbed\t\t end",
    "digits 0 12 345 6789 3.14 ² ٣٤ ½ and x2y3",
    "spaces before digits: x  1   22    333\n\n4 \t5",
    "mixed    runs \n \n  of whitespace \t\n",
    "<|im_start|>user\nsort: dcba<|im_end|>\n<|im_start|>assistant\nabcd<|im_end|><|endoftext|>",
    "special text glued<|im_end|>to words and <|endoftext|>",
    "unknown-to-corpus: Zyzzyva qoph ÆØÅ ŋ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ؟ fin",
    "",
]
# text that NFC changes: decomposed accents, the Angstrom and Kelvin signs, and a combining
# overlay that composes with the ">" closing a special token ("≯") unless the token is cut out first
NOT_NFC = ["cafe\u0301 A\u030a \u212b \u212a elvin", "<|im_end|>\u0338 and x>\u0338y", "<tool_call>\u0338"]
# control bytes, and characters in planes 4-16 (lead bytes 0xF1-0xF4), which vocabularies lack
RARE_BYTES = ["a\x04b", "!\x04!", ".\x06..", " \x13\x14 x", "\x16", "x \x1d\x1d y", "<|im_end|>\x04<|im_end|>",
              "\U00040000 \U000f0000\U000e0100", "tab\x04\tand\x06\n\nnewline"]


def random_texts(n, seed=0):
    """Texts drawn from every kind of character: controls, ASCII, accents, CJK, emoji, rare planes."""
    rng = random.Random(seed)
    pool = [chr(c) for c in range(128)] + ["é", "e\u0301", "日本", "🙂", "\U00040000", "\U000e0100", "  ", "\n\n",
                                          "12", "<|im_end|>", "<|im_start|>", "the", " fox"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 24))) for _ in range(n)]


def assert_same_ids(hf, ours, texts):
    """The same ids as `tokenizers` in both modes, and the same text back."""
    for text in texts:
        hf.encode_special_tokens = False  # Hugging Face's default: special-token text -> its id
        assert ours.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids, text
        hf.encode_special_tokens = True  # special-token text stays text
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    hf.encode_special_tokens = False

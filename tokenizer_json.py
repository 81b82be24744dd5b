"""
tokenizer_json.py -- a Hugging Face tokenizer.json rebuilt as a tiktoken Encoding, exactly or not at all.

A byte-level BPE tokenizer.json (GPT-2, Llama-3, Qwen2/3, SmolLM2) is a vocabulary, merges, a
pre-tokenization regex and added tokens. tiktoken runs the same algorithm, so `translate` rebuilds
the file as a tiktoken Encoding: every field it reads checked (check_tokenizer_json), the pieces
mapped from GPT-2's printable characters back to bytes, the regex recovered from the
pre-tokenizer's steps. What a published file does beyond tiktoken (an NFC normalizer; single
bytes missing from the vocabulary) is done in Python around tiktoken's BPE, for the texts it
touches (Irregular). A file that cannot be reproduced exactly (SentencePiece, another
normalizer, ids out of merge order, ...) is an error, never a silently different tokenization.
tokenizer.py wraps the result in its Tokenizer.

Of the rest of the project this file imports only files.py.
"""

import os
import re
import unicodedata
from typing import NamedTuple

import tiktoken

from files import Fields, read_json


class Translated(NamedTuple):
    """A tokenizer.json as tiktoken runs it.
    enc:            the tiktoken Encoding (its special tokens: every added token)
    irregular:      an Irregular, for a file tiktoken alone cannot reproduce; else None
    bos_id:         the id the post-processor puts before every text, or None
    always_special: the added tokens not marked special, which Hugging Face matches even in plain text"""
    enc: object
    irregular: object
    bos_id: object
    always_special: list


# GPT-2's pre-tokenization split: the ByteLevel pre-tokenizer's own when use_regex is on.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits (each number character a piece of its own) and then GPT-2's split, as SmolLM2 and
# StarCoder chain them, as one regex: nothing else crosses a number character, and whitespace
# just before one ends like whitespace at the end of a text, hence the lookahead (?![^\s\p{N}]).
_DIGITS_GPT2_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def _byte_of_char():
    """Byte-level BPE files spell the 256 bytes as printable characters (GPT-2's
    bytes_to_unicode): printable Latin-1 bytes stand for themselves, the other 68 bytes take
    the characters 256, 257, ... in byte order. Returns that character -> byte map."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _split_pattern(pre, where):
    """The regex whose matches are the pieces that tokenizer.json's pre_tokenizer cuts text
    into, before each piece is mapped to byte-level characters."""
    steps = (pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre]) or [{}]
    steps = [s or {} for s in steps]
    kinds = [s.get("type") for s in steps]
    *first, last = steps
    if last.get("type") == "ByteLevel" and not last.get("add_prefix_space"):
        if not first and last.get("use_regex", True):
            return _GPT2_SPLIT  # GPT-2
        if kinds[:-1] == ["Split"] and not last.get("use_regex", True):  # Llama-3, Qwen2/3
            split = first[0]
            isolated = split.get("behavior") == "Isolated" and not split.get("invert")
            if "Regex" in split.get("pattern", {}) and isolated:
                return split["pattern"]["Regex"]
        if kinds[:-1] == ["Digits"] and last.get("use_regex", True):  # SmolLM2
            if first[0].get("individual_digits"):
                return _DIGITS_GPT2_SPLIT
            return _DIGITS_GPT2_SPLIT.replace(r"\p{N}|", r"\p{N}+|", 1)  # runs of digits
    raise ValueError(f"{where}: pre-tokenizer {' + '.join(map(str, kinds))} (with these options) is not one "
                     "tiktoken can reproduce: byte-level BPE with a regex split is needed")


# Bytes that no UTF-8 text holds: a vocabulary may lack them at no cost.
_NEVER_IN_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])


class Irregular:
    """What a published byte-level BPE tokenizer.json may ask beyond tiktoken, done in Python
    around tiktoken's own BPE for the texts it touches (touches(text)); other texts take
    tiktoken's path unchanged.

    - Single bytes missing from the vocabulary (SmolLM2's lacks 21: 192, 193, 241, 242,
      245-255 and the control bytes 4, 6, 19, 20, 22, 29). Hugging Face's BPE splits the text
      first, then drops each byte it has no token for, or writes the model's unk token in its
      place (one per run of such bytes when fuse_unk); the rest of the piece merges as if the
      byte were not there. tiktoken would panic: a Rust PanicException, a BaseException that
      `except Exception` lets through.
    - An NFC normalizer (Qwen2, Qwen2.5, Qwen3): Hugging Face cuts out the added tokens that
      match the raw text, normalizes the text between them, then cuts out the added tokens
      marked `normalized`, which match the normalized text.
    """

    def __init__(self, enc, pattern, missing, unk_id=None, fuse_unk=False, nfc=False, normalized=()):
        import regex  # tiktoken's own dependency; Python's re lacks \p{L}
        self.enc, self.unk_id, self.fuse_unk, self.nfc = enc, unk_id, fuse_unk, nfc
        self.normalized = frozenset(normalized) if nfc else frozenset()  # added tokens matched after NFC
        self.missing = bytes(sorted(missing))
        self.missing_occurs = any(b not in _NEVER_IN_UTF8 for b in self.missing)
        if self.missing:
            self.missing_run = re.compile(b"([" + b"".join(re.escape(bytes([b])) for b in self.missing) + b"]+)")
        self.split = regex.compile(pattern)
        self._cutters = {}

    def touches(self, text):
        return (self.nfc and not unicodedata.is_normalized("NFC", text)) or self._holds_missing(text)

    def _holds_missing(self, text):
        return self.missing_occurs and self.missing_run.search(text.encode("utf-8", "surrogatepass")) is not None

    def encode(self, text, allowed):
        """Ids of text, the added tokens in `allowed` matched as tokens."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: mended as tiktoken's Encoding.encode mends them
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids, allowed = [], frozenset(allowed)
        for part, is_token in self._cut(text, allowed - self.normalized):
            if is_token:
                ids.append(self.enc.encode_single_token(part))
                continue
            part = unicodedata.normalize("NFC", part) if self.nfc else part
            for sub, is_token in self._cut(part, allowed & self.normalized):
                ids += [self.enc.encode_single_token(sub)] if is_token else self._plain(sub)
        return ids

    def _cut(self, text, tokens):
        """(part, is_token) pairs: text cut at the leftmost, longest matches of `tokens`."""
        if tokens not in self._cutters:
            alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
            self._cutters[tokens] = re.compile(alternatives) if tokens else None
        start, cutter = 0, self._cutters[tokens]
        for m in cutter.finditer(text) if cutter else ():
            if m.start() > start:
                yield text[start:m.start()], False
            yield m.group(), True
            start = m.end()
        if start < len(text):
            yield text[start:], False

    def _plain(self, text):
        """Text without added tokens: tiktoken's split and BPE, except in the pieces that hold a
        missing byte."""
        if not self._holds_missing(text):
            return self.enc.encode_ordinary(text)
        ids = []
        for piece in self.split.findall(text):  # tiktoken's split, by the regex package
            piece = piece.encode("utf-8")
            if self.unk_id is None:  # the missing bytes dropped: the rest merges across the gap
                piece = piece.translate(None, self.missing)
                ids += self.enc._encode_single_piece(piece) if piece else []  # BPE, no split
                continue
            for i, run in enumerate(self.missing_run.split(piece)):  # the unk token stands between
                if i % 2 == 0:  # bytes the vocabulary has, on which tiktoken cannot panic
                    ids += self.enc._encode_single_piece(run) if run else []
                else:
                    ids += [self.unk_id] * (1 if self.fuse_unk else len(run))
        return ids


def translate(path):
    """The Translated tokenizer.json of a Hugging Face directory (byte-level BPE).

    tiktoken splits text with one regex, maps each piece to bytes and merges adjacent parts
    lowest rank first, the rank being the merged token's id. That is Hugging Face's BPE
    exactly when the merges are applied in id order, so ids out of merge order are refused,
    as is every pre- or post-processing step that neither tiktoken nor Irregular reproduces.
    byte_fallback and the unk token act only on bytes the vocabulary lacks: they are checked
    only then.
    """
    where = os.path.join(path, "tokenizer.json")
    tj = read_json(where)
    check_tokenizer_json(tj, where)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: a {model.get('type')} model (SentencePiece-style?) is not byte-level BPE, "
                         "which is all tiktoken can reproduce")
    nfc = _is_nfc(tj.get("normalizer"), where)
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{where}: a decoder other than ByteLevel changes the text (SentencePiece-style?); "
                         "tiktoken cannot reproduce it")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{where}: BPE dropout / subword affixes are not reproducible by tiktoken")
    pattern = _split_pattern(tj.get("pre_tokenizer"), where)
    vocab, byte_of = model["vocab"], _byte_of_char()
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise ValueError(f"{where}: added token {t['content']!r} strips whitespace or matches whole "
                             "words only, which tiktoken cannot reproduce")
    # a token that is a prefix of another: tiktoken may match either, Hugging Face the longest
    names = sorted(added)
    for a, b in zip(names, names[1:]):
        if b.startswith(a):
            raise ValueError(f"{where}: added token {a!r} is a prefix of {b!r}; tiktoken may match either")
    ranks = {}
    for piece, i in vocab.items():
        if piece in added:
            continue
        try:
            ranks[bytes(byte_of[c] for c in piece)] = i
        except KeyError:
            raise ValueError(f"{where}: vocabulary entry {piece!r} is not byte-level") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    unk = model.get("unk_token")
    if missing and model.get("byte_fallback"):
        raise ValueError(f"{where}: byte_fallback writes <0x..> tokens for the {len(missing)} single bytes the "
                         "vocabulary lacks; tiktoken cannot reproduce it")
    if missing and unk is not None and unk not in vocab:
        raise ValueError(f"{where}: the unk token {unk!r} is not in the vocabulary")
    last, made = -1, set()
    for n, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or a not in vocab or b not in vocab:
            raise ValueError(f"{where}: merge {n} ({a!r} {b!r}) involves a token the vocabulary lacks")
        if i < last:  # several merges may make one token (Llama-3 lists every split), hence <
            raise ValueError(f"{where}: token ids are not in merge order (merge {n} makes id {i} after id "
                             f"{last}); tiktoken merges by id, so it would tokenize differently")
        last = i
        made.add(i)
    unmade = [p for p, i in vocab.items() if p not in added and len(p) > 1 and i not in made]
    if unmade:
        raise ValueError(f"{where}: vocabulary entry {unmade[0]!r} is made by no merge; tiktoken could "
                         "produce it where Hugging Face never does")
    try:
        enc = tiktoken.Encoding(name=os.path.basename(os.path.normpath(path)), pat_str=pattern,
                                mergeable_ranks=ranks, special_tokens={c: t["id"] for c, t in added.items()})
    except ValueError as e:  # e.g. a regex tiktoken's engine does not accept
        raise ValueError(f"{where}: tiktoken cannot use it: {e}") from None
    irregular = None
    if missing or nfc:
        irregular = Irregular(enc, pattern, missing, unk_id=vocab.get(unk) if unk is not None else None,
                              fuse_unk=model.get("fuse_unk", False), nfc=nfc,
                              normalized=[c for c, t in added.items() if t.get("normalized", not t.get("special"))])
    always_special = [c for c, t in added.items() if not t.get("special")]
    return Translated(enc, irregular, _bos(tj, where, enc.n_vocab), always_special)


def _is_nfc(normalizer, where):
    """True for an NFC normalizer (alone, or in a Sequence), False for none; any other
    normalizer changes the text in ways tiktoken has no equivalent for."""
    steps = normalizer.get("normalizers", []) if normalizer and normalizer.get("type") == "Sequence" else \
        [normalizer] if normalizer else []
    kinds = [s.get("type") for s in steps]
    if kinds not in ([], ["NFC"]):
        raise ValueError(f"{where}: normalizer {' + '.join(map(str, kinds))} changes the text in ways tiktoken "
                         "cannot reproduce (SentencePiece-style?); byte-level BPE with no normalizer or NFC is needed")
    return kinds == ["NFC"]


def _bos(tj, where, n_vocab):
    """The id a TemplateProcessing post-processor puts before a single text, if any: the first
    of the ids its special_tokens give the token that begins its "single" template, which must
    be there (check_tokenizer_json has checked the fields' types)."""
    pp = tj.get("post_processor") or {}
    for j, p in enumerate(pp.get("processors", [pp])):
        first = (p.get("single") or [{}])[0] if p.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            field = "post_processor" + (f".processors.{j}" if "processors" in pp else "")
            name = first["SpecialToken"]["id"]
            ids = (p.get("special_tokens") or {}).get(name, {}).get("ids")
            if not ids or ids[0] >= n_vocab:
                gives = f"id {ids[0]}, not in [0, {n_vocab})" if ids else "no ids"
                raise ValueError(f"{where}: field '{field}.single' begins with special token {name!r}, to which "
                                 f"'{field}.special_tokens' gives {gives}")
            return ids[0]
    return None


def check_tokenizer_json(tj, where):
    """Every field of a tokenizer.json that hf_tokenizer reads, of the type it needs."""
    def objects(v):
        return type(v) is dict
    f = Fields(tj, where)
    model = f.nested("model")
    model.get("vocab", ..., lambda v: type(v) is dict and all(type(i) is int and i >= 0 for i in v.values()),
              "an object of tokens and their ids (integers >= 0)")
    model.array("merges", lambda m: type(m) is str and " " in m or type(m) is list and len(m) == 2
                and all(type(x) is str for x in m), 'a list of merges, each "a b" or ["a", "b"]')
    for i, t in enumerate(f.array("added_tokens", objects, "a list of objects")):
        token = Fields(t, where, path=f"added_tokens.{i}.")
        token.text("content")
        token.count("id", lo=0)
    f.nested("decoder")
    pre = f.nested("pre_tokenizer")
    for j, step in enumerate(pre.array("pretokenizers", objects, "a list of objects")):
        Fields(step, where, path=f"pre_tokenizer.pretokenizers.{j}.").nested("pattern").text("Regex", None)
    post = f.nested("post_processor")  # its special tokens' ids give the BOS (_bos)
    processors = [post] + [Fields(p, where, path=f"post_processor.processors.{j}.")
                           for j, p in enumerate(post.array("processors", objects, "a list of objects"))]
    for p in processors:
        special = p.nested("special_tokens")
        for name in special.obj:
            special.nested(name).array("ids", lambda i: type(i) is int and i >= 0, "a list of token ids")
        for k, piece in enumerate(p.array("single", objects, "a list of objects")):
            Fields(piece, where, path=f"{p.path}single.{k}.").nested("SpecialToken").text("id", None)

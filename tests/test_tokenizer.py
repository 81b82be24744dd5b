"""Tests for tokenizer.py: bytes, GPT-2 BPE from disk, no downloads."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer  # noqa: E402


# ---------------------------------------------------------------- tokenizer

def test_byte_tokenizer_round_trip_and_specials():
    t = tokenizer.get_tokenizer(verbose=False)  # bytes: conftest.py switches tiktoken's cache off
    assert (t.name, t.eos_id, t.pad_id, t.vocab_size) == ("bytes", 256, 257, 258)
    text = "sort: dbca\nhéllo 日本 🙂"
    ids = t.encode(text)
    assert ids == list(text.encode("utf-8"))  # one id per byte
    assert t.decode(ids) == text
    # special-token text inside user data stays plain text, never the EOS id
    assert 256 not in t.encode("a<|endoftext|>b")
    assert t.decode([97, 256]) == "a<|endoftext|>"
    assert t.decode([97, 258, 5000, 98]) == "ab"  # ids past the vocabulary (padded embeddings) are no text
    # half a UTF-8 character decodes with a replacement char instead of raising
    assert t.decode(list("日".encode())[:2]) == "\ufffd"
    assert t.decode(torch.tensor([104, 105])) == "hi"


def test_no_download_when_cache_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding",
                        lambda name: pytest.fail("get_encoding would try to download"))
    assert tokenizer.get_tokenizer(verbose=False).name == "bytes"


def test_corrupt_cached_gpt2_files_are_not_used(tmp_path, monkeypatch):
    import hashlib
    for url in tokenizer._GPT2_FILES:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_text("truncated download")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding",
                        lambda name: pytest.fail("tiktoken would delete and re-download"))
    assert tokenizer.get_tokenizer(verbose=False).name == "bytes"


def test_gpt2_from_dir_plumbing(tmp_path, monkeypatch):
    # No real GPT-2 files offline: stand in a fake 50256-entry rank table and check that
    # the files are found, tiktoken's cache is off during the read, and the ids are GPT-2's.
    import tiktoken.load
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "vocab.json").write_text("{}")
    seen = {}

    def fake_ranks(merges, vocab):
        seen["files"] = (os.path.basename(merges), os.path.basename(vocab))
        seen["cache"] = os.environ.get("TIKTOKEN_CACHE_DIR")
        ranks = {bytes([i]): i for i in range(256)}
        ranks.update({f"<fake{i}>".encode(): i for i in range(256, 50256)})
        return ranks
    monkeypatch.setattr(tiktoken.load, "data_gym_to_mergeable_bpe_ranks", fake_ranks)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/somewhere")
    t = tokenizer.get_tokenizer(bpe_path=str(tmp_path), verbose=False)
    assert seen == {"files": ("merges.txt", "vocab.json"), "cache": ""}
    assert os.environ["TIKTOKEN_CACHE_DIR"] == "/somewhere"
    assert (t.name, t.eos_id, t.pad_id, t.vocab_size) == ("gpt2", 50256, 50256, 50257)
    assert t.decode(t.encode("héllo")) == "héllo"


def test_explicit_bpe_path_without_files_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="vocab.bpe"):
        tokenizer.get_tokenizer(bpe_path=str(tmp_path), verbose=False)

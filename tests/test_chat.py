"""Conversations (chat.py): TRL's and ultrafeedback_binarized's records loaded, rendered with
the model's chat template exactly as transformers' apply_chat_template renders and encodes
them, and every way a conversation can be wrong stopped in one line before any training."""

import json
import os

import pytest

import chat
import data
import tokenizer
import train
from conftest import extra
from chat_dirs import chat_tokenizer

extra("tokenizers", "interop test")
extra("jinja2", "interop test")

SYSTEM = {"role": "system", "content": "Be brief."}
# content with the edge cases a template meets: leading/trailing spaces (Llama-3 trims them), a
# newline, text that merges across the prompt/answer boundary if encoded in one piece
USER = {"role": "user", "content": " say a: \nthe quick brown fox "}
ANSWER = " aaaa\nbonjour le monde "


def tok_dir(tmp_path, kind="chatml", template=True):
    d = tmp_path / f"tok-{kind}"
    chat_tokenizer(d, kind, template)
    return str(d)


def loaded(d):
    tok = tokenizer.get_tokenizer(d, verbose=False)
    return tok, chat.load_template(tok)


@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_rendering_and_ids_equal_transformers(tmp_path, kind, system):
    transformers = extra("transformers", "interop test")
    d = tok_dir(tmp_path, kind)
    tok, template = loaded(d)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    msgs = ([SYSTEM] if system else []) + [USER]
    prompt = template.prompt(msgs)
    assert prompt == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok.encode_prompt(prompt)
    assert ids == hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    if kind == "llama3":  # the template's BOS, and no second one from the tokenizer
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    # prompt + response (ending in EOS) is what the template writes for the whole conversation,
    # token for token, up to its end-of-turn token; ChatML writes one "\n" after it
    full = hf.apply_chat_template(msgs + [{"role": "assistant", "content": ANSWER}], return_dict=True)["input_ids"]
    ours = ids + tok.encode_response(template.response(prompt, ANSWER))
    assert ours == full[:len(ours)] and ours[-1] == tok.eos_id
    assert hf.decode(full[len(ours):]) == ("\n" if kind == "chatml" else "")


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def conversation(answer):
    return [SYSTEM, USER, {"role": "assistant", "content": answer}]


# one preference pair in each form; all must load as the same strings
EXPLICIT = {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "aaaa"}],
            "rejected": [{"role": "assistant", "content": "xyz"}]}
IMPLICIT = {"chosen": conversation("aaaa"), "rejected": conversation("xyz")}
# a line of ultrafeedback_binarized's train_prefs as datasets' to_json writes it
ULTRAFEEDBACK = {"prompt": USER["content"], "prompt_id": "0f3a9e", "chosen": conversation("aaaa"),
                 "rejected": conversation("xyz"), "messages": conversation("aaaa"),
                 "score_chosen": 8.5, "score_rejected": 3.0}


def test_conversational_records_load_as_rendered_strings(tmp_path):
    d = tok_dir(tmp_path)
    tok, template = loaded(d)
    prefs = write(tmp_path, "prefs.jsonl", [EXPLICIT, IMPLICIT, ULTRAFEEDBACK])
    prompts = write(tmp_path, "prompts.jsonl", [{"prompt": [SYSTEM, USER], "reference": "aaaa"},
                                                {"prompt": "say b:"},  # a string: one user turn
                                                ULTRAFEEDBACK])  # test_prefs: its chosen answer is the reference
    sft = write(tmp_path, "sft.jsonl", [{"messages": conversation("aaaa")},
                                        {"prompt": "say b:", "completion": "bbbb"}])
    td = data.load_user_data(sft, prefs, prompts, 1, template)
    want = template.prompt([SYSTEM, USER])
    assert want.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    pairs = td.chunks[0]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [(want, "aaaa", "xyz")] * 3
    # the strings carry what they are: text the template wrote, and the prompt's messages
    assert all(isinstance(p[k], tokenizer.Templated) for p in pairs for k in ("prompt", "chosen", "rejected"))
    assert pairs[2]["prompt"].messages == [SYSTEM, USER]
    assert td.eval[0] == {"prompt": want, "reference": "aaaa"} and td.eval[1]["reference"] is None
    assert td.eval[1]["prompt"].messages == [{"role": "user", "content": "say b:"}]
    assert td.eval[2] == {"prompt": want, "reference": "aaaa"}
    assert td.sft == [(want, "aaaa"), (template.prompt([{"role": "user", "content": "say b:"}]), "bbbb")]
    # plain-text records load as they always did, Templated nowhere
    plain = write(tmp_path, "plain.jsonl", [{"prompt": "say a:", "chosen": "aaaa", "rejected": "x", "extra": 1}])
    td = data.load_user_data(None, plain, write(tmp_path, "p.jsonl", [{"prompt": "say a:"}]), 1, template)
    assert td.chunks[0][0]["prompt"] == "say a:" and type(td.chunks[0][0]["prompt"]) is str


def run_flags(tmp_path, tok, prefs, judge="tasks.sorting:judge", extra=()):
    sft = write(tmp_path, "sft.jsonl", [{"messages": conversation("aaaa")}] * 4)
    prompts = write(tmp_path, "prompts.jsonl", [{"prompt": [SYSTEM, USER]}] * 2)
    return ["--model", "tiny", "--bpe-path", tok, "--block-size", "128", "--sft", sft, "--prefs", prefs,
            "--prompts", prompts, "--judge", judge, "--iterations", "0", "--sft-steps", "2",
            "--out-dir", str(tmp_path / "out"), *extra]


def pair(chosen, rejected, **kw):
    return {"chosen": chosen, "rejected": rejected, **kw}


A, U = (lambda c: {"role": "assistant", "content": c}), (lambda c: {"role": "user", "content": c})
RAISES = '{% for m in messages %}{% if m.role == "system" %}{{ raise_exception("System role not supported") }}' \
         '{% endif %}{{ m.content }}{% endfor %}'
BAD = {
    "no assistant turn": ([pair([SYSTEM, U("hi")], [SYSTEM, U("hi")])], "chosen has no assistant turn"),
    "last turn not the assistant's": ([pair([U("hi"), A("a"), U("more?")], [U("hi"), A("b")])],
                                      "the last turn of chosen is 'user''s, not the assistant's"),
    "no shared prompt": ([pair([U("hi"), A("a")], [U("bye"), A("b")])], "chosen and rejected share no prompt prefix"),
    "nothing before the answer": ([pair([A("a")], [A("b")])], "share no prompt prefix"),
    "differ before the last turn": ([pair([U("hi"), A("a"), U("x"), A("c")], [U("hi"), A("b"), U("x"), A("d")])],
                                    "differ at turn 2"),
    "not a message": ([pair([U("hi"), {"role": "assistant"}], [U("hi"), A("b")])], "message 2"),
    "explicit prompt ends with the answer": ([{"prompt": [U("hi")], "chosen": [A("x"), U("no")], "rejected": [A("b")]}],
                                             "the last turn of chosen is 'user''s"),
    "explicit prompt ends with an assistant turn": (  # two assistant turns in a row, as --prompts refuses
        [{"prompt": [U("hi"), A("x")], "chosen": [A("a")], "rejected": [A("b")]}],
        "the prompt's last turn is the assistant's: there is nothing to answer"),
    "implicit prompt ends with an assistant turn": ([pair([U("hi"), A("x"), A("a")], [U("hi"), A("x"), A("b")])],
                                                    "the prompt's last turn is the assistant's"),
    "template fails to render": ([IMPLICIT], "failed to render: TemplateError: System role not supported"),
    "response longer than the context": ([pair([U("hi"), A("a" * 400)], [U("hi"), A("b")])], "context is 128"),
    "no template": ([IMPLICIT], "a conversation needs the model's chat template"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_conversations_are_one_line_before_training(tmp_path, case):
    rows, msg = BAD[case]
    template = {"template fails to render": RAISES, "no template": False}.get(case, True)
    tok = str(tmp_path / "tok")
    chat_tokenizer(tmp_path / "tok", "chatml", template)
    prefs = write(tmp_path, "prefs.jsonl", [IMPLICIT] + rows)  # the bad record on line 2
    with pytest.raises(SystemExit) as e:
        train.main(run_flags(tmp_path, tok, prefs))
    err = str(e.value)
    assert msg in err and "\n" not in err, err
    if case == "no template":  # the first conversation of the first file: the SFT file
        assert "sft.jsonl:1:" in err, err
    elif case == "template fails to render":
        assert "sft.jsonl:1:" in err, err  # the SFT file is read first
    elif case == "response longer than the context":
        assert "prefs.jsonl:2: chosen: prompt+response is" in err, err
    else:
        assert "prefs.jsonl:2:" in err, err
    assert not os.path.exists(tmp_path / "out" / "sft.pt")  # nothing trained on partial data


@pytest.mark.parametrize("record", [{"messages": [U("hi"), A("x"), A("a")]},
                                    {"prompt": [U("hi")], "completion": [A("x"), A("a")]}])
def test_a_demonstration_whose_prompt_ends_with_an_assistant_turn_is_one_line(tmp_path, record):
    chat_tokenizer(tmp_path / "tok", "chatml")
    flags = run_flags(tmp_path, str(tmp_path / "tok"), write(tmp_path, "prefs.jsonl", [IMPLICIT]))
    flags[flags.index("--sft") + 1] = write(tmp_path, "bad_sft.jsonl", [{"messages": conversation("aaaa")}, record])
    with pytest.raises(SystemExit) as e:
        train.main(flags)
    assert "bad_sft.jsonl:2: the prompt's last turn is the assistant's" in str(e.value), str(e.value)


def test_a_users_judge_sees_the_rendered_prompt_and_its_messages(tmp_path):
    _, template = loaded(tok_dir(tmp_path))
    seen = []
    prompt = template.prompt([SYSTEM, USER])
    data.judge_block(lambda p, cs: seen.append((p, p.messages, cs)) or [0.0] * len(cs), [(prompt, ["aaaa", "b"])])
    assert seen == [(prompt, [SYSTEM, USER], ["aaaa", "b"])] and str(prompt).endswith("<|im_start|>assistant\n")


def test_fit_keeps_the_records_that_fit(tmp_path, capsys):
    from tools import fit
    d = tok_dir(tmp_path)
    long = {"chosen": conversation("a" * 2000), "rejected": conversation("x")}
    path = write(tmp_path, "prefs.jsonl", [IMPLICIT, long, ULTRAFEEDBACK])
    fit.main([d, "128", path])
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [IMPLICIT, ULTRAFEEDBACK]
    assert "kept 2 of 3 records" in err
    # what it keeps, a run loads and fits; a malformed record is an error, not dropped
    kept = write(tmp_path, "kept.jsonl", [json.loads(line) for line in out.splitlines()])
    td = data.load_user_data(None, kept, kept, 1, loaded(d)[1])
    data.check_fits(td, tokenizer.get_tokenizer(d, verbose=False), 128, "", kept)
    with pytest.raises(SystemExit, match=r"prefs.jsonl:2: chosen has no assistant turn"):
        fit.main([d, "128", write(tmp_path, "prefs.jsonl", [IMPLICIT, {"chosen": [USER], "rejected": [USER]}])])


def test_a_template_that_does_not_parse_or_does_not_end_turns_with_eos():
    with pytest.raises(ValueError, match=r"^the chat template of dir does not parse: .*line 1"):
        chat.ChatTemplate("{% if %}", "dir", {}, "<|im_end|>").prompt([USER])
    plain = chat.ChatTemplate("{% for m in messages %}{{ m.content }}\n{% endfor %}", "dir", {}, "<|im_end|>")
    with pytest.raises(ValueError, match="does not end the assistant's turn with the tokenizer's end-of-sequence"):
        plain.response(plain.prompt([USER]), "aaaa")

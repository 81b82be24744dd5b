"""Your own prompts and judge, no preference data (--train-prompts): the starting model's
--pair-samples answers to each training prompt, judged by your --judge, make the offline pairs
(pairs.own_pairs, the step the instruction task uses too), which the run trains on end to end;
--prompts stays the held-out evaluation. On a tiny random Llama with a ChatML tokenizer."""

import json

import pytest

import chat
import train
from chat_dirs import tiny_chat_model
from conftest import extra

extra("tokenizers", "trains a chat tokenizer")
extra("jinja2", "renders the chat template")
extra("safetensors", "writes the model directory")

# A judge that can tell random answers apart (their distinct characters), and that refuses a
# prompt it is not shown as the run writes it: a conversation in the chat template (.messages)
JUDGE = '''
def judge(prompt, candidates):
    if {conversational} and not getattr(prompt, "messages", None):
        raise ValueError("judged a prompt that is not the rendered conversation")
    return [len(set(c)) / 100 for c in candidates]
'''
SETTINGS = ["--iterations", "1", "--pair-samples", "3", "--max-new-tokens", "6", "--batch-size", "2",
            "--micro-batch-size", "2", "--gen-batch-size", "4"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), block_size=256)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user_files(tmp_path, conversational):
    said = (lambda text: [{"role": "user", "content": text}]) if conversational else (lambda text: text)
    (tmp_path / "myjudge.py").write_text(JUDGE.format(conversational=conversational))
    return {"--train-prompts": write_jsonl(tmp_path / "train.jsonl", [{"prompt": said(f"say {c}:")} for c in
                                                                      "abcdefghijkl"]),
            "--prompts": write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"say {c}:"} for c in "wxyz"]),
            "--judge": str(tmp_path / "myjudge.py") + ":judge"}


def argv(model, files, out, *extra):
    return ["--init-from", model, "--out-dir", str(out), *SETTINGS, *[x for kv in files.items() for x in kv], *extra]


@pytest.mark.parametrize("conversational", [True, False], ids=["conversations", "plain-text"])
def test_a_users_judge_makes_the_pairs_and_the_run_trains_on_them(chat_model, tmp_path, conversational):
    from pairs import PAIRS_FILE
    files = user_files(tmp_path, conversational)
    out = tmp_path / "out"
    results = train.run(train.parse_args(argv(chat_model, files, out)))
    assert [r["stage"] for r in results] == ["sft", "dpo", "selm_1"]
    lines = [json.loads(x) for x in open(out / PAIRS_FILE)]
    header, pairs = lines[0], lines[1:]
    assert header["settings"]["k"] == 3 and header["settings"]["judge"] == "myjudge:judge"
    assert (header["settings"]["template"] is None) == (not conversational)
    given = [json.loads(x)["prompt"] for x in open(files["--train-prompts"])]
    for p in pairs:  # each pair: two of the model's answers to a given prompt, scored by the user's judge
        assert p["prompt"] in given[6 * p["chunk"]:6 * p["chunk"] + 6]
        assert p["chosen_score"] == len(set(p["chosen"])) / 100 > p["rejected_score"] == len(set(p["rejected"])) / 100
    log = [json.loads(x) for x in open(out / "metrics.jsonl")]
    (made,) = [r["offline_pairs"] for r in log if "offline_pairs" in r]
    assert [n + d for n, d in zip(made["pairs"], made["dropped_ties"])] == [6, 6]  # 12 prompts, 2 chunks
    assert made["pairs"] == [sum(p["chunk"] == c for p in pairs) for c in (0, 1)]
    cut = sum(not p[f] for p in pairs for f in ("chosen_finished", "rejected_finished"))
    assert made["unfinished_chosen"] + made["unfinished_rejected"] == cut > 0  # 6 tokens rarely end: unfinished
    from pairs import rendered
    from tokenizer import get_tokenizer
    tok = get_tokenizer(chat_model, verbose=False)
    template = chat.load_template(tok) if conversational else None
    for p in pairs:  # trained as they were sampled: an answer cut off gets no EOS
        (e,), = rendered([[p]], template)
        assert (tok.encode_response(e["chosen"])[-1] in tok.eos_ids) == p["chosen_finished"]
    (online,) = [r["online"] for r in log if r.get("stage") == "selm_1" and "online" in r]
    assert online["pairs"] > 0


def test_train_prompts_records_are_checked_in_one_line(chat_model, tmp_path):
    files = user_files(tmp_path, True)
    for content, msg in [('{"prompt": [{"role": "user", "content": "hi"}]}\n{"text": "x"}\n',
                          "train.jsonl:2: missing field 'prompt'"),
                         ('{"prompt": [{"role": "assistant", "content": "hi"}]}\n', "train.jsonl:1: the prompt's "
                          "last turn is the assistant's"),
                         ('{"prompt": "a"}\n', "train.jsonl: 1 prompts cannot fill 2 chunks"),
                         ('{"prompt": "a"}\n{"prompt": "' + "long " * 300 + '"}\n',
                          "do not fit after the longest training prompt")]:
        (tmp_path / "train.jsonl").write_text(content)
        with pytest.raises(SystemExit) as e:
            train.main(argv(chat_model, files, tmp_path / "out"))
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not (tmp_path / "out").exists()
    # the too long prompt named by its line
    assert "train.jsonl:2" in str(e.value)


def test_the_pairs_cache_keys_on_the_users_judge_code(tmp_path):
    """A change to the judge's file makes the pairs it judged stale (pairs.judge_rules)."""
    import types

    import inputs
    from pairs import judge_rules
    (tmp_path / "j.py").write_text(JUDGE.format(conversational=False))
    cfg = types.SimpleNamespace(judge=str(tmp_path / "j.py") + ":judge", task="sorting")
    before = judge_rules(cfg, inputs.load_judge(cfg.judge))
    assert judge_rules(cfg, inputs.load_judge(cfg.judge)) == before
    (tmp_path / "j.py").write_text(JUDGE.format(conversational=False) + "# a changed rule\n")
    assert judge_rules(cfg, inputs.load_judge(cfg.judge)) != before

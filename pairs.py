"""
pairs.py -- offline pairs from the starting model's own answers, judged, and their cache.

The recipe of UltraFeedback, where the paper's offline pairs come from: k answers of the starting
model per prompt, judged; the best becomes chosen and the worst rejected, and a prompt whose
answers all tie is dropped (build_pairs). own_pairs runs it on any prompts and judge: a chat
task's (--task instructions), or your own --train-prompts judged by your --judge (prompts and a
judge that can check an answer, no preference data: the RLVR setting). Sampling k answers for
every prompt of every chunk is the slowest step of such a run, so the pairs are kept in the run's
directory (PAIRS_FILE), keyed on everything that shapes them and checked whole before they are
reused (cached_pairs, its key pair_settings): pipeline state, like a checkpoint.
"""

import hashlib
import importlib
import json
import os
import sys
from dataclasses import replace
from typing import NamedTuple

import chat
from checkpoint import weights_digest
from data import DataError, judge_name, read_jsonl
from files import write_jsonl_atomic
from runtime import sample_responses
from selm import penalise_unfinished


def own_pairs(rt, cfg, tok, model, task_data):
    """The offline pairs of task_data's chunks of prompts: --pair-samples answers of the starting
    model to each prompt, at temperature 1 (a prompt's answers share one prefill), judged by
    task_data.judge; the best becomes chosen and the worst rejected, and a prompt whose answers
    all tie is dropped; one cut off at --max-new-tokens stays unfinished, as y_ref does. A prompt
    is answered and judged as training will write it (as_prompt). Built once and kept in
    --out-dir (cached_pairs), where a resumed run, or one started from this run's stage, finds
    them. Returns (task_data with its chunks of prompts turned into chunks of pairs, the record
    the metrics log keeps of them)."""
    template = chat.load_template(tok) if task_data.conversational else None
    bar = rt.bar(None, f"offline pairs: prompts, {cfg.pair_samples} answers each", sum(map(len, task_data.chunks)))

    def text(r):  # an answer as text without its EOS; one cut off at --max-new-tokens has none
        words = tok.decode([t for t in r if t not in tok.eos_ids])
        return words if r and r[-1] in tok.eos_ids else Unfinished(words)

    def sample(prompts, k, seed):  # k answers per prompt, sharing its prefill
        ids = [tok.encode_prompt(as_prompt(p, template)) for p in prompts]
        runs = sample_responses(rt, cfg, tok, model, ids, 1.0, [answer_seed(seed, j) for j in range(k)], bar)
        return [[text(r) for r in answers] for answers in runs]

    def score(prompts, answers):  # as the online step judges: in blocks shared out over the ranks
        return rt.judge(task_data.judge, [as_prompt(p, template) for p in prompts], answers, cfg.gen_batch_size)
    elsewhere = [os.path.dirname(os.path.abspath(cfg.start_from))] if cfg.start_from else []
    made = cached_pairs(cfg.out_dir, task_data.chunks, sample, cfg.pair_samples, cfg.task_seed,
                        pair_settings(cfg, tok, model, template, rt, task_data.judge), write=rt.ranks.main,
                        elsewhere=elsewhere, score=score, penalty=cfg.missing_eos_penalty)
    bar.close()
    rt.ranks.barrier()
    empty = [i for i, chunk in enumerate(made.chunks) if not chunk]
    if empty:
        raise DataError(f"the starting model's {cfg.pair_samples} answers tied on every prompt of chunk {empty[0]}: no "
                        f"offline pair to train on (can the judge tell {cfg.init_from}'s answers apart?)")
    task_data = replace(task_data, chunks=rendered(made.chunks, template))
    return task_data, {**offline_record(task_data), "dropped_ties": made.dropped}


def as_prompt(prompt, template=None):
    """A prompt as training writes it, and as its answers are sampled and judged: a user turn (or
    the conversation given) in the model's chat template (template: a chat.ChatTemplate), or the
    plain text itself in a run without one."""
    return template.prompt(chat.user_turn(prompt, "prompt")) if template is not None else prompt


def answer_seed(seed, j):
    """The seed of the j-th answers to a chunk's prompts, from the chunk's own (--task-seed plus
    its number): the pairs are data, the same for every training seed."""
    return 1_000_003 * (seed + 1) + j


class Unfinished(str):
    """An answer the sampler cut off at its token limit: it stays unfinished in training, with no
    end-of-turn token after it, as a y_ref does (build_pairs and rendered keep the mark;
    Tokenizer.encode_response reads it)."""
    finished = False


def build_pairs(prompts, sample, k=4, seed=0, *, score, penalty=0.0):
    """UltraFeedback's recipe: sample(prompts, k, seed) -> k answers per prompt (the starting model
    at temperature 1; the prompts as the user gave them, which the sampler writes as the run
    writes them; an answer cut off is an Unfinished), all judged by score(prompts, answers) ->
    per prompt one checked score per answer (runtime.Runtime.judge, data.judge_block); the best
    answer becomes chosen and the worst rejected (the first of equals). A prompt whose answers
    all tie is dropped. penalty: taken from the score of an answer cut off (--missing-eos-penalty)
    before they are ranked; the scores kept are the judge's own. Returns ([{"prompt", "chosen",
    "rejected", "chosen_score", "rejected_score", "chosen_finished", "rejected_finished"}], dropped)."""
    answers = sample(prompts, k, seed)
    if len(answers) != len(prompts) or any(len(a) != k for a in answers):
        raise ValueError(f"sample() must return {k} answers for each of {len(prompts)} prompts")
    pairs = []
    judged = score(prompts, answers)
    ranked = penalise_unfinished(judged, [[not isinstance(a, Unfinished) for a in ans] for ans in answers], penalty)
    for p, ans, scores, by in zip(prompts, answers, judged, ranked):
        best, worst = by.index(max(by)), by.index(min(by))
        if by[best] > by[worst]:
            pairs.append({"prompt": p, "chosen": str(ans[best]), "rejected": str(ans[worst]),
                          "chosen_score": scores[best], "rejected_score": scores[worst],
                          "chosen_finished": not isinstance(ans[best], Unfinished),
                          "rejected_finished": not isinstance(ans[worst], Unfinished)})
    return pairs, len(prompts) - len(pairs)


PAIRS_FILE = "instruction_pairs.jsonl"  # the name the instruction task, its first user, gave it
PAIR, FINISHED = ("prompt", "chosen", "rejected"), ("chosen_finished", "rejected_finished")


class Made(NamedTuple):
    """The offline pairs of every chunk (a list of pair lists), and per chunk the prompts dropped
    because their answers all tied."""
    chunks: list
    dropped: list


def cached_pairs(out_dir, chunks, sample, k=4, seed=0, settings=None, write=True, elsewhere=(), *, score,
                 penalty=0.0):
    """The offline pairs of every chunk, as Made: built by build_pairs (chunk i sampled with seed
    + i, judged by `score`) and kept in out_dir/PAIRS_FILE: a header {"settings", "chunks": a
    digest of each chunk's prompts, "dropped", "pairs": their number, "sha256": their checksum},
    then a pair with its "chunk" per line. A later call reuses a file whose settings match (k,
    seed and `settings`: JSON values of everything else that shapes the answers: the model, its
    tokenizer and chat template, the sampling settings, the judge, ...) and whose chunks begin
    with this call's: a run of T iterations reads the pairs a longer run made. Such a file is
    checked whole (read_pairs). Otherwise the pairs are built again and the file replaced
    atomically. elsewhere: more directories whose file may serve (a run started from another
    run's stage); write: whether this process writes the file (under torchrun, rank 0 only)."""
    # a penalty is part of the key when one is given: the files of runs without it stay valid
    want = {"settings": json.loads(json.dumps({"k": k, "seed": seed, **({"missing_eos_penalty": penalty} if penalty
                                                                         else {}), **(settings or {})})),
            "chunks": [hashlib.sha256(json.dumps(c).encode()).hexdigest()[:16] for c in chunks]}
    for d in (out_dir, *elsewhere):
        rows = read_pairs(os.path.join(d, PAIRS_FILE), want)
        if rows is not None:
            if d != out_dir and write:  # the run keeps its own copy: its --resume needs nothing else
                write_jsonl_atomic(os.path.join(out_dir, PAIRS_FILE), rows)
            return Made([[{f: r[f] for f in PAIR + FINISHED} for r in rows[1:] if r["chunk"] == i]
                         for i in range(len(chunks))], rows[0]["dropped"][:len(chunks)])
    built = [build_pairs(c, sample, k, seed + i, score=score, penalty=penalty) for i, c in enumerate(chunks)]
    body = [{"chunk": i, **e} for i, (ps, _) in enumerate(built) for e in ps]
    if write:
        write_jsonl_atomic(os.path.join(out_dir, PAIRS_FILE), [
            {**want, "dropped": [d for _, d in built], "pairs": len(body), "sha256": checksum(body)}] + body)
    return Made([[{f: e[f] for f in PAIR + FINISHED} for e in ps] for ps, _ in built], [d for _, d in built])


def pair_settings(cfg, tok, model, template, rt, judge):
    """Everything that shapes the offline pairs besides their prompts, the number of answers and
    the seed (cached_pairs keys its cache on these): the weights, the tokenizer and the chat
    template (None: plain prompts), the sampling settings (--gen-batch-size sets each block's
    seed), the device (its random numbers) and dtype, and the judge with its rules (judge_rules).
    cfg: the run's train.Config; template: the model's chat.ChatTemplate; rt: its runtime.Runtime."""
    written = template and hashlib.sha256(json.dumps([template.text, template.specials]).encode()).hexdigest()[:16]
    return {"model": weights_digest(model), "tokenizer": tok.digest(), "template": written,
            "max_new_tokens": cfg.max_new_tokens, "temperature": 1.0, "gen_batch_size": cfg.gen_batch_size,
            "device": rt.device.type, "dtype": str(rt.dtype), "judge": judge_name(judge),
            "rules": judge_rules(cfg, judge)}


def judge_rules(cfg, judge):
    """A fingerprint of what the judge's scores depend on besides what it is shown: a task's code
    (its judge and the chapters it reads, for a --task's own judge), a reward model's weights
    (--judge rm:DIR), or the code of a --judge function (its file and those it takes names from)."""
    if cfg.judge is None:
        return files_digest(code_files(vars(importlib.import_module(f"tasks.{cfg.task}"))))  # checked: load_task
    model = getattr(judge, "model", None)
    return weights_digest(model) if model is not None else files_digest(code_files(getattr(judge, "__globals__", {})))


def code_files(names):
    """The files of a module, given its names (vars(module), a function's __globals__), and of the
    modules it takes names from (one level) that are selm's chapters or beside it: a task's rules,
    its judge's code included (tasks/instructions.py reads constraints.py's)."""
    own = names.get("__file__") or ""
    places = {os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(own)) if own else None}
    used = {v if isinstance(v, type(sys)) else sys.modules.get(getattr(v, "__module__", None) or "")
            for v in names.values()}
    paths = {own} | {getattr(m, "__file__", None) or "" for m in used}
    return sorted({os.path.abspath(p) for p in paths if p and os.path.dirname(os.path.abspath(p)) in places - {None}})


def files_digest(paths):
    """A short fingerprint of the files' bytes: a changed rule makes the pairs it judged stale."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def offline_record(task_data):
    """The offline pairs, for the first screen and the metrics log: pairs per chunk, and the
    answers among them cut off at --max-new-tokens (trained unfinished: no EOS follows them)."""
    unfinished = {k: sum(getattr(e[k], "finished", True) is False for c in task_data.chunks for e in c)
                  for k in ("chosen", "rejected")}
    return {"pairs": [len(c) for c in task_data.chunks], **{f"unfinished_{k}": v for k, v in unfinished.items()}}


def checksum(rows):
    """The sha256 of rows as PAIRS_FILE holds them, one JSON line each."""
    return hashlib.sha256("\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()).hexdigest()


def read_pairs(path, want):
    """The rows of a PAIRS_FILE whose settings are want's and whose chunks begin with want's;
    None when there is no such file, or it was made with other settings. A file of want's
    settings is checked whole -- its number of pairs, their checksum, each pair's fields -- and
    a damaged one is refused in one line, as is a file that is none of selm's: neither is read
    as valid, nor replaced."""
    if not os.path.isfile(path):
        return None
    rows = [rec for _, rec in read_jsonl(path)]
    header, body = rows[0], rows[1:]
    if not isinstance(header.get("settings"), dict) or not isinstance(header.get("chunks"), list):
        raise DataError(f"{path}: not a pairs file of selm's (its first line has no settings and chunks); move it, "
                        "or give another --out-dir")
    if header["settings"] != want["settings"] or header["chunks"][:len(want["chunks"])] != want["chunks"]:
        return None  # a file of other settings: built again and replaced

    def whole(r):
        return type(r.get("chunk")) is int and 0 <= r["chunk"] < len(header["chunks"]) \
            and all(type(r.get(f)) is str for f in PAIR) and all(type(r.get(f)) is bool for f in FINISHED)
    damage = (f"its header counts {header.get('pairs')} pairs, it holds {len(body)}" if header.get("pairs") != len(body)
              else "its pairs do not match its checksum" if header.get("sha256") != checksum(body)
              else "a pair lacks a field" if not all(map(whole, body)) else None)
    if damage:
        raise DataError(f"{path}: damaged ({damage}); remove it to build the pairs again")
    return rows


def rendered(chunks, template=None):
    """Each chunk's pairs as training reads them (prompts not yet answered kept as they are):
    rendered with the chat template, or plain text without one; an answer the sampler cut off
    stays unfinished (chat.Templated with finished=False, or an Unfinished)."""
    def pair(e):
        if template is None:
            return {"prompt": e["prompt"], **{k: e[k] if e.get(f"{k}_finished", True) else Unfinished(e[k])
                                             for k in ("chosen", "rejected")}}
        r = chat.preference_pair(e, template)
        return {**r, **{k: chat.Templated(r[k], finished=False) for k in ("chosen", "rejected")
                        if e.get(f"{k}_finished") is False}}
    return [[pair(e) if isinstance(e, dict) else e for e in c] for c in chunks]

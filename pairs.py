"""
pairs.py -- offline pairs from the starting model's own answers, judged, and their cache.

The recipe of UltraFeedback, where the paper's offline pairs come from: k answers of the starting
model per prompt, judged; the best becomes chosen and the worst rejected, and a prompt whose
answers all tie is dropped (build_pairs). Sampling k answers for every prompt of every chunk is
the slowest step of a chat model's run, so the pairs are kept in the run's directory
(PAIRS_FILE), keyed on everything that shapes them and checked whole before they are reused
(cached_pairs, its key pair_settings): pipeline state, like a checkpoint. The sampler and the
judge come from the caller (train.instruction_pairs: the instruction task's prompts and judge).
"""

import hashlib
import importlib
import json
import os
import sys

import chat
from checkpoint import weights_digest
from data import DataError, call_judge, judge_name, read_jsonl
from files import write_jsonl_atomic


class Unfinished(str):
    """An answer the sampler cut off at its token limit: it stays unfinished in training, with no
    end-of-turn token after it, as a y_ref does (build_pairs and rendered keep the mark)."""


def build_pairs(prompts, sample, k=4, seed=0, *, judge):
    """UltraFeedback's recipe: sample(prompts, k, seed) -> k answers per prompt (the starting model
    at temperature 1; the prompts are plain user turns, which the sampler renders as the run
    renders them; an answer cut off is an Unfinished), each judged by judge(prompt, candidates)
    (checked: data.call_judge); the best answer becomes chosen and the worst rejected (the first
    of equals). A prompt whose answers
    all tie is dropped. Returns ([{"prompt", "chosen", "rejected", "chosen_score", "rejected_score",
    "chosen_finished", "rejected_finished"}], dropped)."""
    answers = sample(prompts, k, seed)
    if len(answers) != len(prompts) or any(len(a) != k for a in answers):
        raise ValueError(f"sample() must return {k} answers for each of {len(prompts)} prompts")
    pairs = []
    for p, ans in zip(prompts, answers):
        scores = call_judge(judge, p, ans)
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        if scores[best] > scores[worst]:
            pairs.append({"prompt": p, "chosen": str(ans[best]), "rejected": str(ans[worst]),
                          "chosen_score": scores[best], "rejected_score": scores[worst],
                          "chosen_finished": not isinstance(ans[best], Unfinished),
                          "rejected_finished": not isinstance(ans[worst], Unfinished)})
    return pairs, len(prompts) - len(pairs)


PAIRS_FILE = "instruction_pairs.jsonl"
PAIR, FINISHED = ("prompt", "chosen", "rejected"), ("chosen_finished", "rejected_finished")


def cached_pairs(out_dir, chunks, sample, k=4, seed=0, settings=None, write=True, elsewhere=(), *, judge):
    """The offline pairs of every chunk (a list of pair lists), built by build_pairs (chunk i
    sampled with seed + i, judged by `judge`) and kept in out_dir/PAIRS_FILE: a header {"settings", "chunks": a
    digest of each chunk's prompts, "dropped", "pairs": their number, "sha256": their checksum},
    then a pair with its "chunk" per line. A later call reuses a file whose settings match (k,
    seed and `settings`: JSON values of everything else that shapes the answers: the model, its
    tokenizer and chat template, the sampling settings, ...) and whose chunks begin with this
    call's: a run of T iterations reads the pairs a longer run made. Such a file is checked whole
    (read_pairs). Otherwise the pairs are built again and the file replaced atomically.
    elsewhere: more directories whose file may serve (a run started from another run's stage);
    write: whether this process writes the file (under torchrun, rank 0 only)."""
    want = {"settings": json.loads(json.dumps({"k": k, "seed": seed, **(settings or {})})),
            "chunks": [hashlib.sha256(json.dumps(c).encode()).hexdigest()[:16] for c in chunks]}
    for d in (out_dir, *elsewhere):
        rows = read_pairs(os.path.join(d, PAIRS_FILE), want)
        if rows is not None:
            if d != out_dir and write:  # the run keeps its own copy: its --resume needs nothing else
                write_jsonl_atomic(os.path.join(out_dir, PAIRS_FILE), rows)
            return [[{f: r[f] for f in PAIR + FINISHED} for r in rows[1:] if r["chunk"] == i]
                    for i in range(len(chunks))]
    built = [build_pairs(c, sample, k, seed + i, judge=judge) for i, c in enumerate(chunks)]
    body = [{"chunk": i, **e} for i, (ps, _) in enumerate(built) for e in ps]
    if write:
        write_jsonl_atomic(os.path.join(out_dir, PAIRS_FILE), [
            {**want, "dropped": [d for _, d in built], "pairs": len(body), "sha256": checksum(body)}] + body)
    return [[{f: e[f] for f in PAIR + FINISHED} for e in ps] for ps, _ in built]


def pair_settings(cfg, tok, model, template, rt):
    """Everything that shapes a chat task's offline pairs besides their prompts, the number of
    answers and the seed (pairs.cached_pairs keys its cache on these): the weights, the tokenizer
    and the chat template, the sampling settings (--gen-batch-size sets each block's seed), the
    device (its random numbers) and dtype, and the judge with its rules (the task's code).
    cfg: the run's train.Config; template: the model's chat.ChatTemplate; rt: its runtime.Runtime."""
    task = importlib.import_module(f"tasks.{cfg.task}")  # checked by inputs.load_task
    return {"model": weights_digest(model), "tokenizer": tok.digest(),
            "template": hashlib.sha256(json.dumps([template.text, template.specials]).encode()).hexdigest()[:16],
            "max_new_tokens": cfg.max_new_tokens, "temperature": 1.0, "gen_batch_size": cfg.gen_batch_size,
            "device": rt.device.type, "dtype": str(rt.dtype), "judge": judge_name(task.TASK.judge),
            "rules": files_digest(code_files(task))}


def code_files(module):
    """The files of a module and of the chapters it takes names from (one level): a task's rules,
    its judge's code included (tasks/instructions.py reads constraints.py's)."""
    here = os.path.dirname(os.path.abspath(__file__))
    used = {module} | {v if isinstance(v, type(sys)) else sys.modules.get(getattr(v, "__module__", None) or "")
                       for v in vars(module).values()}
    return sorted(path for path in {getattr(m, "__file__", None) or "" for m in used} if path.startswith(here + os.sep))


def files_digest(paths):
    """A short fingerprint of the files' bytes: a changed rule makes the pairs it judged stale."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def offline_record(task_data):
    """A chat task's offline pairs, for the metrics log: pairs per chunk, and the
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


def rendered(chunks, template):
    """Each chunk's pairs rendered with the chat template (plain prompts kept as they are); an
    answer the sampler cut off stays unfinished (chat.Templated with finished=False)."""
    def pair(e):
        r = chat.preference_pair(e, template)
        return {**r, **{k: chat.Templated(r[k], finished=False) for k in ("chosen", "rejected")
                        if e.get(f"{k}_finished") is False}}
    return [[pair(e) if isinstance(e, dict) else e for e in c] for c in chunks]

"""
real.py -- perf.bench's real-model section (--sections real --init-from DIR): a Hugging Face
chat model on disk, e.g. SmolLM2-135M-Instruct (python -m tools.gguf_to_hf --smollm2 DIR),
against what a user would otherwise run on it. The conversations are made up here (chat_pairs);
their content does not matter to a timing, their ragged lengths do. fp32 on both sides; with
--bf16, bf16 on both: train.py's --dtype bfloat16 against TRL's bf16=True, sampler.generate's
dtype=bf16 against transformers' generate on bf16 weights (whose greedy tokens may then part
from ours at a near-tie: the share of equal answers is printed, not required).

  dpo        one epoch of offline DPO over the same 64 conversational pairs, batch 8, fp32:
             train.py's (the reference's log-probs once, then the epoch) against TRL's
             DPOTrainer (the optional trl package; its reference model runs in every step).
             Pairs per second, and peak memory: the bytes tensors hold at the peak above the
             loaded policy (measure.peak_memory), TRL's reference copy included. Both keep
             their activations (TRL's default gradient checkpointing off), both at the same
             learning rate, beta and maximum length; TRL's optimizer is its default. Three
             interleaved rounds, each side starting from the weights on disk (loaded untimed),
             and no warm-up round: an epoch takes a minute.
  sampling   sampler.generate against transformers' generate, greedy, on 32 chat prompts of
             ragged lengths until EOS or 64 new tokens: tokens per second, and the same tokens
             (a difference stops the benchmark).
  iteration  where one SELM iteration of train.py spends its time on this model: sampling,
             judging, reference log-probs, optimizer steps (train.py's own clock).
"""

import gc
import json
import os
import random
import tempfile
import warnings

import torch

from perf.measure import (Timings, header, peak_memory, report, report_iteration, selm_iteration_times,
                          silenced, timed)
from perf.sampling import left_pad

TOPICS = ["the sea", "bread", "a bicycle", "winter", "the moon", "coffee", "a library", "rain", "chess",
          "a lighthouse", "honey", "trains", "a garden", "snow", "the desert", "music"]


def chat_pairs(n, seed=0, most=8):
    """n conversational preference pairs of ragged lengths: asked for k <= most sentences about
    a topic (every third with a system turn of its own), chosen answers with k sentences on it,
    rejected ones with a sentence on another."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, other, k = rng.choice(TOPICS), rng.choice(TOPICS), rng.randint(1, most)
        system = [{"role": "system", "content": "You are a concise assistant."}] if i % 3 == 0 else []
        chosen = " ".join(f"Sentence {j + 1} is about {topic}, and it says something plain and true." for j in range(k))
        rows.append({"prompt": system + [{"role": "user", "content": f"Write {k} short sentences about {topic}."}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": f"I would rather talk about {other}."}]})
    return rows


def judge(prompt, candidates):
    """The iteration's judge (perf.real:judge): answers that name the asked-for topic most often,
    shorter ones first among equals."""
    topic = prompt.messages[-1]["content"].rsplit("about ", 1)[-1].rstrip(".")
    return [c.count(topic) - len(c) / 1e4 for c in candidates]


def write_data(d, pairs):
    """pairs as --prefs and the first 4 of their prompts as --prompts (each stage's evaluation,
    which no figure here times), in directory d; their argv."""
    files = {"prefs.jsonl": pairs, "prompts.jsonl": [{"prompt": p["prompt"]} for p in pairs[:4]]}
    for name, rows in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return ["--prefs", os.path.join(d, "prefs.jsonl"), "--prompts", os.path.join(d, "prompts.jsonl"),
            "--judge", "perf.real:judge"]


def bench_real(args, device):
    n_pairs, batch, rounds = (16, 8, 1) if args.quick else (64, 8, 3)
    pairs = chat_pairs(n_pairs, most=1 if args.quick else 8)
    with tempfile.TemporaryDirectory() as d:
        data_args = write_data(d, pairs)
        bench_dpo(args, device, d, data_args, pairs, batch, rounds)
        bench_chat_sampling(args, device, pairs[:8 if args.quick else 32], 8 if args.quick else 64, rounds)
        bench_iteration(args, device, data_args, n_pairs // 2)


def dtype_name(args):
    return "bfloat16" if args.bf16 else "float32"


# ---- 1. a DPO epoch: train.py against TRL's DPOTrainer ------------------------------------------

LR, BETA, MAX_LEN = 1e-6, 0.1, 512


def selm_dpo(args, device, d, data_args, batch):
    """(fn() loading the policy, fn(policy) running one offline-DPO epoch as train.py runs it)."""
    import train
    from data import check_fits
    from inputs import build_model, check_config, tokenizer_and_data
    from runtime import setup
    cfg = train.parse_args(["--init-from", args.init_from, *data_args, "--iterations", "0", "--sft-steps", "0",
                            "--batch-size", str(batch), "--micro-batch-size", str(batch), "--lr", str(LR),
                            "--beta", str(BETA), "--block-size", str(MAX_LEN), "--dtype", dtype_name(args),
                            "--device", device.type, "--out-dir", os.path.join(d, "selm")])
    check_config(cfg)
    os.makedirs(cfg.out_dir)  # its metrics.jsonl: the epoch's log lines
    rt = setup(cfg.device, cfg.dtype, cfg.out_dir)
    torch.backends.cuda.matmul.allow_tf32 = False  # setup allows TF32; fp32 means fp32 here
    with silenced():
        tok, data = tokenizer_and_data(cfg, rt)
    check_fits(data, tok, MAX_LEN, "", cfg.prefs)  # as train.py checks: every pair within MAX_LEN

    def load():
        with silenced():
            return build_model(cfg, tok, rt)

    def epoch(policy):
        with silenced():
            train.offline_dpo(rt, cfg, tok, policy, data.chunks[0])
    return load, epoch


def trl_dpo(args, device, d, pairs, batch):
    """(fn() loading the policy, fn(policy) building TRL's DPOTrainer, fn(trainer) running its
    epoch); None without trl."""
    try:
        import datasets
        import transformers
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        print(f"  (no TRL baseline: {e.name} is not installed: pip install trl)")
        return None
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = transformers.AutoTokenizer.from_pretrained(args.init_from)
    with warnings.catch_warnings():  # transformers 5 renames gradient_checkpointing; every version knows it
        warnings.simplefilter("ignore", FutureWarning)
        config = DPOConfig(output_dir=os.path.join(d, "trl"), per_device_train_batch_size=batch, num_train_epochs=1,
                           learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LEN,
                           gradient_checkpointing=False, bf16=args.bf16, fp16=False, use_cpu=device.type == "cpu",
                           report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    dataset = datasets.Dataset.from_list(pairs)

    def load():
        with silenced():  # transformers' progress bar
            return transformers.AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).to(device)

    def build(policy):
        with silenced():
            return DPOTrainer(model=policy, args=config, train_dataset=dataset, processing_class=tok)

    def epoch(trainer):
        with silenced():
            trainer.train()
        assert trainer.state.global_step == -(-len(pairs) // batch), "TRL took another number of steps"
    return load, build, epoch


def bench_dpo(args, device, d, data_args, pairs, batch, rounds):
    n_pairs = len(pairs)
    header(f"a DPO epoch on {args.init_from}: {n_pairs} conversational pairs, batch {batch}, {dtype_name(args)}, "
           f"at most {MAX_LEN} tokens; train.py against TRL's DPOTrainer")
    our_load, our_epoch = selm_dpo(args, device, d, data_args, batch)
    trl = trl_dpo(args, device, d, pairs, batch)
    sides = {"ours": (our_load, our_epoch)}
    if trl is not None:
        their_load, build, their_epoch = trl
        sides["trl"] = (lambda: build(their_load()), their_epoch)
    times = {name: [] for name in sides}
    for _ in range(rounds):  # interleaved; each side starts from the weights on disk, loaded untimed
        for name, (prepare, run) in sides.items():
            state = prepare()
            times[name].append(timed(lambda: run(state), device)[0])
            del state
            gc.collect()
    times = Timings(times)
    policy = our_load()
    mine = peak_memory(lambda: our_epoch(policy), device)
    del policy
    if trl is None:
        report("real: DPO epoch", n_pairs / times["ours"], None, "pairs/s")
        report("real: DPO epoch peak memory", mine / 2**20, None, "MiB")
        return
    policy = their_load()
    their_mem = peak_memory(lambda: their_epoch(build(policy)), device)
    del policy
    gc.collect()
    ratio, spread = times.ratio("trl", "ours")
    report("real: DPO epoch vs TRL", n_pairs / times["ours"], n_pairs / times["trl"], "pairs/s", target=1.5,
           ratio=ratio, spread=spread, note=f"{times['ours']:.1f} s against {times['trl']:.1f} s an epoch")
    report("real: DPO epoch peak memory vs TRL", mine / 2**20, their_mem / 2**20, "MiB", target=1.0, better="lower",
           note="bytes held by tensors above the loaded policy; TRL's includes its reference copy")


# ---- 2. the sampler against transformers' generate ----------------------------------------------

def bench_chat_sampling(args, device, pairs, max_new_tokens, rounds):
    import transformers

    import hf
    from chat import load_template
    from sampler import generate
    from tokenizer import get_tokenizer
    n_prompts = len(pairs)
    header(f"greedy answers to {n_prompts} chat prompts of ragged lengths, until EOS or {max_new_tokens} tokens: "
           "sampler.generate against transformers' generate")
    tok = get_tokenizer(args.init_from, verbose=False)
    template = load_template(tok)
    prompts = [tok.encode_prompt(template.prompt(p["prompt"])) for p in pairs]
    ours = hf.load_pretrained(args.init_from).to(device).eval()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with silenced():  # transformers' progress bar
        theirs = transformers.AutoModelForCausalLM.from_pretrained(args.init_from, dtype=dtype)
    theirs = theirs.to(device).eval()
    idx, mask = left_pad(prompts, device, tok.pad_id)
    P, eos = idx.shape[1], sorted(tok.eos_ids)

    def mine():  # the bf16 weights made from the fp32 ones inside the timed call, as a run makes them
        return generate(ours, prompts, max_new_tokens, temperature=0, eos_id=tok.eos_ids, pad_id=tok.pad_id,
                        dtype=dtype)[0]

    @torch.inference_mode()
    def hf_generate():
        out = theirs.generate(idx, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=tok.pad_id)[:, P:].tolist()
        return [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in out]

    times = {"ours": [], "hf": []}
    outs = {}
    for _ in range(rounds + 1):  # the first round warms up, untimed
        for name, fn in (("ours", mine), ("hf", hf_generate)):
            t, outs[name] = timed(fn, device)
            times[name].append(t)
    differ = [i for i, (a, b) in enumerate(zip(outs["ours"], outs["hf"])) if a != b]
    if differ and not args.bf16:
        i = differ[0]
        at = next((t for t, (a, b) in enumerate(zip(outs["ours"][i], outs["hf"][i])) if a != b),
                  min(map(len, (outs["ours"][i], outs["hf"][i]))))
        raise RuntimeError(f"sampler.generate and transformers' generate chose different greedy tokens in "
                           f"{len(differ)} of {n_prompts} answers (the first: answer {i}, token {at})")
    times = Timings({k: v[1:] for k, v in times.items()})
    n_tokens, n_theirs = sum(map(len, outs["ours"])), sum(map(len, outs["hf"]))
    ratio, spread = times.ratio("hf", "ours")
    per_token = n_tokens / n_theirs  # compare tokens/s: in bf16 the two may give answers of other lengths
    report("real: greedy chat answers vs HF generate", n_tokens / times["ours"], n_theirs / times["hf"], "tok/s",
           target=1.5, ratio=ratio * per_token, spread=tuple(x * per_token for x in spread),
           note=f"{n_tokens} tokens, {n_prompts - len(differ)} of {n_prompts} answers the same from both; "
                f"{sum(r[-1] in tok.eos_ids for r in outs['ours'] if r)} ended with EOS; {dtype_name(args)}")


# ---- 3. where a SELM iteration's time goes ---------------------------------------------------------

def bench_iteration(args, device, data_args, n_prompts):
    max_new = 8 if args.quick else 64
    header(f"one SELM iteration of train.py on {args.init_from}: {n_prompts} prompts, greedy answers of up to "
           f"{max_new} tokens, batch 8")
    info = selm_iteration_times(["--init-from", args.init_from, *data_args, "--sft-steps", "0", "--iterations", "1",
                                 "--batch-size", "8", "--micro-batch-size", "8", "--max-new-tokens", str(max_new),
                                 "--block-size", str(MAX_LEN),
                                 "--device", device.type, "--dtype", dtype_name(args)])
    report_iteration(info, "real: iteration")

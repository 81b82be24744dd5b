"""
runtime.py -- the plumbing under train.py: devices and precision, processes, logs, bars.

Nothing here is about SELM. It is what lets the same pipeline run on a laptop CPU, one GPU
or several under torchrun:
  - the device (`--device` checked, for train.py and sample.py alike), the autocast dtype
    (bf16 where the hardware and the model's width gain from it) and TF32;
  - `Ranks`: the processes torchrun started, how work is cut into blocks and gathered back;
  - `Runtime`: what every stage needs besides the model (device, autocast, ranks, log), and
    the wrapping of a model for training (DDP, torch.compile);
  - sampling, scoring and judging a list of prompts in blocks shared out over the ranks;
  - the metrics log (metrics.jsonl), progress bars, a clock.
How a stage trains is training.py's, what the user is told screens.py's.
"""

import json
import os
import time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import collate, collate_shared, judge_block
from files import write_error
from sampler import compile_seconds, generate
from selm import reference_logps


# ---- device and precision -----------------------------------------------------------------

def check_device(name):
    """The device --device names ("auto" passes as it is): cpu, cuda, cuda:N or mps, and one
    that this PyTorch build and this machine have. A ValueError in one line otherwise."""
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:N, mps, or auto)")
    usable = {"cuda": torch.cuda.is_available, "mps": mps_available}
    if not usable.get(device.type, lambda: True)():
        build = f"PyTorch {torch.__version__}"
        if device.type == "cuda":
            build += f", built with CUDA {torch.version.cuda} but no GPU is visible" if torch.version.cuda \
                else ", a build without CUDA"
        raise ValueError(f"--device {name} is not available in this PyTorch build ({build})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs")
    return device


def mps_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype


def cpu_bf16_units():
    """The bf16 matrix instructions of this CPU that torch's oneDNN matmuls use ("AMX-BF16",
    "AVX512-BF16"), as torch reports them; none where it cannot tell (another build or
    architecture). With either, a bf16 matmul runs several times faster than a fp32 one."""
    try:
        caps = torch._C._cpu._get_cpu_capability()  # private, hence guarded: a dict of ISA flags
        if not torch.backends.mkldnn.is_available():
            return []
    except (AttributeError, RuntimeError):
        return []
    return [name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if caps.get(key)]


# The narrowest model bf16 autocast speeds up on a CPU: below it the casts and the extra
# elementwise work cost more than the matmuls save (fp32 / bf16 time of a training step of 64
# rows and of sampling 256 rows, 4 layers, 1 and 2 threads, 2-core Xeon with AMX: width 128
# 0.55-0.69x and 0.92-1.15x, 192 0.90-0.95x and 1.35-1.49x, 256 1.25-1.35x and 1.67-1.85x)
BF16_MIN_WIDTH = 256


def compute_dtype(device, name, width=None):
    """--dtype `name` on `device` for a model `width` wide (None: not known yet): (the autocast
    dtype, None for plain fp32; why, in words). auto: bf16 on a GPU that has it (fp16 on one
    that lacks it) and on a CPU with bf16 matrix instructions for a model at least
    BF16_MIN_WIDTH wide; fp32 elsewhere (a narrower model, an older CPU, an Apple GPU)."""
    if name != "auto":
        return (None if name == "float32" else getattr(torch, name)), "--dtype " + name
    if device.type == "cuda":
        return (torch.bfloat16, "this GPU has bf16") if torch.cuda.is_bf16_supported() else \
            (torch.float16, "this GPU lacks bf16")
    if device.type != "cpu":
        return None, f"no autocast on {device.type}"
    units = cpu_bf16_units()
    if not units:
        return None, "this CPU has no bf16 matrix unit (AMX or AVX512-BF16)"
    if width is not None and width < BF16_MIN_WIDTH:
        return None, f"a model {width} wide runs faster in fp32, bf16 matrix units or not"
    return torch.bfloat16, f"this CPU has {' and '.join(units)}"


def pick_device(name, local_rank=0):
    """"auto" picks cuda, then mps, then cpu. Under torchrun each process takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    device = check_device(name)
    if device.type == "cuda":
        index = local_rank if device.index is None else device.index
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


# ---- processes ------------------------------------------------------------------------------

class Ranks:
    """The processes torchrun started (or just this one). Work that produces data --
    sampling, judging, scoring -- is cut into fixed blocks; block b goes to rank b % world,
    and the results are gathered in block order, so every rank ends up with the same data
    in the same order, identical to a single process doing every block itself."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0

    def init(self, device):
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def map_blocks(self, fn, items, block, progress=None):
        """[fn(start, items[start:start + block]) for each block], concatenated in order.
        progress(n): told of n more items done after each of this rank's blocks, counting the
        other ranks' blocks of the same round as done too (exact in one process)."""
        starts, mine, done = range(0, len(items), block), [], 0
        for s in starts[self.rank::self.world]:
            mine.append((s, fn(s, items[s:s + block])))
            if progress is not None:
                now = min(len(items), s - self.rank * block + self.world * block)  # the end of this round
                progress(now - done)
                done = now
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, mine)
            mine = [x for part in parts for x in part]
        return [y for _, out in sorted(mine, key=lambda t: t[0]) for y in out]

    def gather(self, items):
        """Every rank's list, concatenated in rank order."""
        if self.world == 1:
            return items
        parts = [None] * self.world
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        """Leave the process group, every rank done (at interpreter exit gloo's threads can abort)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ---- the metrics log ----------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed line by line; only
    rank 0 writes.

    A crash can tear the last line, and a stage that was running when the process died
    wrote lines that its rerun will write again. So every checkpoint records the file's
    length, and on --resume the file is cut back to that length (`truncate`)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def write(self, row):
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
            except OSError as e:  # a full disk: one line naming the file (a torn line is cut on --resume)
                raise (write_error(e, self.path) or e) from None

    def size(self):
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def truncate(self, size):
        """Cut the log back to `size` bytes; never longer (truncate would pad it with NUL bytes)."""
        if self.enabled and os.path.exists(self.path):
            if size > self.size():
                raise ValueError(f"{self.path} is {self.size()} bytes, shorter than the {size} to keep")
            with open(self.path, "r+") as f:
                f.truncate(size)


def read_metrics(path):
    """The rows of a metrics.jsonl, skipping a torn (unparseable) last line. A log with NUL
    bytes was damaged (a file cut or padded under a writer), not torn: it is refused."""
    rows = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if "\0" in line:
            raise ValueError(f"{path}:{i + 1}: NUL bytes: a damaged log")
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 2 or (i == len(lines) - 2 and lines[-1] != ""):
                raise ValueError(f"{path}:{i + 1}: corrupted line (not the last one)") from None
    return rows


class CompiledTrunk(torch.nn.Module):
    """model.forward with its trunk (embeddings -> blocks -> final norm) compiled and its LM
    head eager. The head selects the positions to score with a boolean mask, a shape that
    changes with every batch: inside a compiled graph that would recompile at every new count
    (and fall back to eager after eight). The trunk's shapes are the batch's, which the
    stage pads to one length (Runtime.to_device): one graph serves a whole stage."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.trunk = torch.compile(model.hidden, dynamic=False)

    def forward(self, idx, position_ids=None, attention_mask=None, output_mask=None):
        return self.model.head(self.trunk(idx, position_ids, attention_mask), output_mask)


# ---- what every stage needs ---------------------------------------------------------------

@dataclass
class Runtime:
    """Device, autocast dtype (None = plain fp32) and why it was picked, processes, metrics
    log, whether the training forward and the sampler's decode step are compiled, whether the
    model is sharded (FSDP2) and its blocks' activations recomputed in the backward pass."""
    device: torch.device
    dtype: object
    ranks: Ranks
    log: MetricsLog
    compile: bool = False
    fsdp: bool = False
    checkpointing: bool = False
    compile_seconds: float = 0.0  # spent compiling decode steps so far: `clock` counts it apart
    why_dtype: str = ""  # compute_dtype's reason, for the first screen

    def autocast(self):
        return nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def fit_dtype(self, name, model):
        """Settle --dtype `name` for `model` once it is built: auto weighs its width too
        (compute_dtype: a narrow model runs faster in fp32 on a CPU)."""
        self.dtype, self.why_dtype = compute_dtype(self.device, name, model.config.n_embd)

    def wrap(self, model):
        """The module to train through: DDP under torchrun, optionally with a compiled trunk;
        under FSDP the model itself (`prepare` sharded it). Sampling and scoring use
        `unsharded(model)`, saving `state_dict(model)`."""
        if self.fsdp:
            return model
        m = CompiledTrunk(model) if self.compile else model
        if self.ranks.world > 1:
            m = DDP(m, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return m

    # -- sharding (FSDP2) and activation checkpointing --

    def prepare(self, model):
        """Once per run, after the weights are loaded: recompute each block's activations in
        the backward pass instead of keeping them (--activation-checkpointing), and shard every
        block and the root over the ranks (--fsdp): each rank then holds 1/world of the
        weights, gradients and AdamW state. On a GPU the shards compute in the autocast dtype
        and reduce gradients in fp32. Both keep the parameter names, so checkpoints are alike."""
        from torch.distributed._composable import checkpoint
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        blocks = list(model.transformer.h)
        if self.checkpointing:
            for block in blocks:
                checkpoint(block)
        if self.fsdp:
            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32) \
                if self.device.type == "cuda" and self.dtype is not None else MixedPrecisionPolicy()
            for block in blocks:
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        return model

    def unsharded(self, model, copy=False):
        """The model to sample and score with, outside training. Under FSDP: a plain copy with
        the full weights, gathered once (decoding through sharded blocks would all-gather every
        weight at every token); it costs one full set of weights per rank while it lives.
        Otherwise the model itself (a deep copy with copy=True)."""
        if not self.fsdp:
            return deepcopy(model) if copy else model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        with self.device:  # built where it runs: initialising billions of weights on a CPU first takes minutes
            plain = type(model)(model.config)
        plain.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
        return plain.train(model.training)

    def state_dict(self, model):
        """The weights as plain tensors on the CPU, for a checkpoint: under FSDP gathered to
        rank 0 (every rank must call this; the others get an empty dict)."""
        if not self.fsdp:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def accumulate(self, train_model, sync):
        """Around one micro-batch's backward: all-reduce (DDP) or reduce-scatter (FSDP) the
        gradients only at the last micro-batch of a step (`sync`)."""
        if self.fsdp:
            train_model.set_requires_gradient_sync(sync)
            return nullcontext()
        return nullcontext() if sync or self.ranks.world == 1 else train_model.no_sync()

    def to_device(self, batch, fixed_len=None, pad_id=0):
        """Move a collated batch to the device. Under compile, first right-pad it to the
        stage's longest sequence (fixed_len; a batch of data.collate_shared comes padded):
        one shape for the whole stage means one compiled graph (padding is masked out of
        every loss, and right padding never touches real tokens)."""
        if self.compile and fixed_len:
            extra = fixed_len - batch["input_ids"].shape[1]
            batch = {k: F.pad(v, (0, extra), value=pad_id if k == "input_ids" else False)
                     for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- work cut into blocks and shared out over the ranks (Ranks.map_blocks) --

    def blocks(self, fn, items, block, progress=None):
        """Ranks.map_blocks with a progress bar: progress is a description (a bar of its own for
        this call), a bar to advance (one phase of several calls, see `bar`), or None."""
        bar = self.bar(None, progress, total=len(items)) if isinstance(progress, str) else progress
        try:
            return self.ranks.map_blocks(fn, items, block, None if bar is None else bar.update)
        finally:
            if isinstance(progress, str):
                bar.close()

    def sample(self, model, prompt_ids, block, seed=0, progress=None, **kw):
        """sampler.generate's responses to every prompt, in blocks of `block` prompts, computed
        in the run's dtype; the seed of a block depends only on its position. seed: an int (one
        answer per prompt), or one per answer (a list of k: per prompt a list of its k answers,
        which share one prefill). progress: as in `blocks`, counting prompts. kw: generate's
        keyword arguments. The seconds spent compiling decode steps on the way add up in
        self.compile_seconds."""
        compiled, k = compile_seconds(model), len(seed) if isinstance(seed, (list, tuple)) else None

        def answers(start, prompts):
            seeds = seed + start if k is None else [s + start for s in seed]
            out = generate(model, prompts, seed=seeds, samples=k or 1, dtype=self.dtype, **kw)[0]
            return out if k is None else [out[i:i + k] for i in range(0, len(out), k)]
        out = self.blocks(answers, prompt_ids, block, progress)
        self.compile_seconds += compile_seconds(model) - compiled
        return out

    def clock(self):
        """A Clock whose laps leave out the seconds this runtime spent compiling decode steps
        (reported apart, as t_compile): a lap that sampled reports its net sampling time."""
        return Clock(lambda: self.compile_seconds)

    def logps(self, model, rows, pad_id, block, progress=None):
        """Summed response log-probs of (prompt_ids, response_ids) rows under `model`, without
        grad in eval mode (selm.reference_logps): (N,) fp32 on the CPU."""
        def score(_, rows):
            batches = (collate(rows[i:i + block], pad_id) for i in range(0, len(rows), block))
            with self.autocast():
                return reference_logps(model, batches).float().cpu().tolist()
        return torch.tensor(self.blocks(score, rows, block, progress), dtype=torch.float32)

    def example_logps(self, model, examples, pad_id, block, progress=None):
        """Summed log-probs of every response of data.Examples under `model`, each prompt run
        once (data.collate_shared), without grad in eval mode: (n_parts, N) fp32 on the CPU,
        rows chosen, rejected, then each y_ref."""
        n_parts = len(examples[0].responses())

        def score(_, exs):
            batches = (collate_shared(exs[i:i + block], pad_id) for i in range(0, len(exs), block))
            with self.autocast():
                return reference_logps(model, batches, n_parts).float().cpu().T.tolist()  # per example
        return torch.tensor(self.blocks(score, examples, block, progress), dtype=torch.float32).T

    def judge(self, judge, prompts, candidates, block, progress=None):
        """The judge's checked scores of every (prompt, candidate list) (data.judge_block: a
        reward model scores a whole block in batches)."""
        return self.blocks(lambda _, items: judge_block(judge, items), list(zip(prompts, candidates)), block, progress)

    def bar(self, iterable, desc, total=None):
        """A progress bar on stderr, rank 0's only, with a count and an ETA; it shows once its
        phase has run for 2 s, and leaves no line behind."""
        return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=1.0, delay=2.0,
                    disable=not self.ranks.main)

    def say(self, *args):
        if self.ranks.main:
            print(*args)


def sample_responses(rt, cfg, tok, model, prompt_ids, temperature=0.0, seed=0, progress=None):
    """Responses to every prompt as a run samples them (cfg: its train.Config, whose --gen-batch-size,
    --max-new-tokens, --compile apply; tok: its EOS and padding), sharded over the ranks: token
    lists, EOS included when emitted. seed: an int, or per prompt a list of one per answer (each
    at its own temperature when temperature is a list too); progress: Runtime.blocks'."""
    return rt.sample(model, prompt_ids, cfg.gen_batch_size, seed, progress, max_new_tokens=cfg.max_new_tokens,
                     temperature=temperature, eos_id=tok.eos_ids, pad_id=tok.pad_id, compile=cfg.compile)


def setup(device_name, dtype, out_dir, compile=False, fsdp=False, checkpointing=False):
    """The Runtime of this process: device picked, process group joined, TF32 on for CUDA
    matmuls (fp32 accuracy is not needed there: training runs under autocast anyway)."""
    ranks = Ranks()
    device = pick_device(device_name, ranks.local_rank)
    ranks.init(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), enabled=ranks.main)
    amp, why = compute_dtype(device, dtype)  # bf16 autocast where the hardware has it, else fp32
    return Runtime(device, amp, ranks, log, compile, fsdp, checkpointing, why_dtype=why)


# ---- timing ----------------------------------------------------------------------------------

class Clock:
    """Seconds between successive laps, by name. compiling() is a running total of seconds
    spent compiling (Runtime.clock: the sampler's decode steps): what of it falls in a lap is
    left out of the lap and added up apart, as t_compile."""

    def __init__(self, compiling=lambda: 0.0):
        self.compiling = compiling
        self.t, self.compiled, self.laps = time.time(), compiling(), {}

    def lap(self, name):
        now, compiled = time.time(), self.compiling()
        self.laps[name] = now - self.t - (compiled - self.compiled)
        if compiled > self.compiled:
            self.laps["t_compile"] = self.laps.get("t_compile", 0.0) + compiled - self.compiled
        self.t, self.compiled = now, compiled

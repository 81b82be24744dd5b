"""generate(..., compile=True): the fixed-shape decode step compiled once per bucket (CPU here,
torch.compile's default mode; tests/test_cuda.py checks CUDA graphs). Compiled and eager must
give the same tokens, the same samples for a seed, and see the weights a training step has just
changed. Each new bucket costs a few seconds of compiling: these tests share two, one per
model family."""

import pytest
import torch
import torch.nn.functional as F

import sampler
from model import GPT, preset
from sampler import bucket, generate

FAMILIES = {"gpt2": {}, "qwen2-like": dict(model_type="qwen2", n_head=4, n_kv_head=2, n_inner=96, qkv_bias=True)}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]  # 3 rows: padded to a batch of 4


def tiny(kw, seed=0):
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=61, **kw)).eval()


@pytest.fixture(scope="module", params=FAMILIES.values(), ids=FAMILIES.keys())
def model(request):
    return tiny(request.param)


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 64, 65, 96, 97, 128, 129, 200, 300, 600)] == \
           [64, 64, 96, 96, 128, 128, 192, 256, 384, 768]
    assert all(n <= bucket(n) <= 1.5 * n for n in range(64, 5000))


def test_compiled_equals_eager(model):
    eager, fin = generate(model, PROMPTS, 14, temperature=0)
    assert generate(model, PROMPTS, 14, temperature=0, compile=True) == (eager, fin)
    for kw in (dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.9)):
        a = generate(model, PROMPTS, 14, seed=7, **kw)
        b = generate(model, PROMPTS, 14, seed=7, compile=True, **kw)
        assert a == b and a[0] != eager  # the same samples, and not merely the greedy ones
    # stopping at EOS: rows end where eager ends them
    eos = eager[1][3]
    assert generate(model, PROMPTS, 14, temperature=0, eos_id=eos, compile=True) == \
        generate(model, PROMPTS, 14, temperature=0, eos_id=eos)


def test_bucket_reused_and_its_stale_cache_hidden(model):
    generate(model, PROMPTS, 14, temperature=0, compile=True)  # compiled (or already was)
    graphs, compiled = len(sampler._COMPILED[model]), sampler.compile_seconds(model)
    # other prompt lengths, max_new_tokens and batch size in the same bucket (4 rows, 64 slots):
    # no new graph. The longer prompts of the call before left keys in slots these rows must
    # not see.
    for prompts, n in [([[5, 4, 3], [2], [7] * 5], 20), (PROMPTS[::-1] + [[9, 9]], 9), ([[1] * 30, [2], [3, 3]], 33)]:
        assert generate(model, prompts, n, temperature=0, compile=True) == \
            generate(model, prompts, n, temperature=0)
    assert len(sampler._COMPILED[model]) == graphs and sampler.compile_seconds(model) == compiled


def test_compiled_step_sees_training_updates():
    """SELM trains the policy in place between sampling rounds: the compiled step must read the
    weights as they are now (no freezing, no stale copy). Its first call compiles, and
    the runtime's clock counts those seconds apart from sampling (t_compile, not t_sample)."""
    import time

    from runtime import Ranks, Runtime
    m = tiny(FAMILIES["gpt2"])
    rt = Runtime(torch.device("cpu"), None, Ranks(), None)
    clock, t0 = rt.clock(), time.time()
    before = rt.sample(m, PROMPTS, 4, max_new_tokens=14, temperature=0, compile=True)
    clock.lap("t_sample")
    wall = time.time() - t0
    assert rt.compile_seconds == sampler.compile_seconds(m) > 0.1  # compiling takes seconds
    assert clock.laps["t_compile"] == rt.compile_seconds and 0 <= clock.laps["t_sample"] < wall - 0.1
    assert abs(clock.laps["t_sample"] + clock.laps["t_compile"] - wall) < 0.05
    rt.sample(m, PROMPTS, 4, max_new_tokens=14, temperature=0, compile=True)  # the bucket is compiled
    clock.lap("t_sample")
    assert rt.compile_seconds == clock.laps["t_compile"]  # no new compile, nothing more set apart
    assert before == generate(m, PROMPTS, 14, temperature=0, compile=True)[0]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-2)
    m.train()
    ids = torch.randint(1, 61, (8, 20), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        logits = m(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    after = generate(m, PROMPTS, 14, temperature=0, compile=True)[0]
    assert after == generate(m, PROMPTS, 14, temperature=0)[0]
    assert after != before  # the update changed what is decoded: the check above means something
    assert m.training  # generate puts the model back as it found it

"""What only a GPU can check: the CUDA paths of the model, the sampler and the log-probs
(TF32, bf16 autocast, SDPA's CUDA kernels, a compiled trunk, the sampler's decode step captured
as a CUDA graph). Skipped without CUDA; the GPU check (.ci/gpu-check) runs them."""

import pytest
import torch

from model import GPT, preset
from sampler import generate
from selm import sequence_logps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAMILIES = {"gpt2": {}, "qwen2-like": dict(model_type="qwen2", n_head=4, n_kv_head=2, n_inner=96, qkv_bias=True)}


def model(kw, seed=0):
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=300, **kw)).cuda().eval()


def ragged(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (int(L),), generator=g).tolist() for L in torch.randint(3, 20, (n,), generator=g)]


@pytest.mark.parametrize("kw", FAMILIES.values(), ids=FAMILIES.keys())
def test_cached_greedy_equals_each_prompt_alone_fp32(kw):
    m, prompts = model(kw), ragged()
    torch.backends.cuda.matmul.allow_tf32 = False
    batch, _ = generate(m, prompts, 12, temperature=0)
    alone = [generate(m, [p], 12, temperature=0)[0][0] for p in prompts]
    assert batch == alone


@pytest.mark.parametrize("kw", FAMILIES.values(), ids=FAMILIES.keys())
def test_bf16_autocast_logps_close_to_fp32(kw):
    m = model(kw)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (6, 40), generator=g).cuda()
    resp = torch.zeros(6, 40, dtype=torch.bool, device="cuda")
    resp[:, 20:] = True
    with torch.no_grad():
        ref = sequence_logps(m, ids, resp)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp = sequence_logps(m, ids, resp)
    assert lp.dtype == torch.float32
    # 20 tokens of log-prob each: bf16 activations move a sum by a few hundredths of a nat
    torch.testing.assert_close(lp, ref, atol=0.2, rtol=0.01)


@pytest.mark.parametrize("kw", FAMILIES.values(), ids=FAMILIES.keys())
def test_compiled_trunk_equals_eager(kw):
    from runtime import CompiledTrunk
    m = model(kw).train()
    ids = torch.randint(0, 300, (4, 32), device="cuda")
    mask = torch.zeros(4, 32, dtype=torch.bool, device="cuda")
    mask[:, 10:] = True
    eager = m(ids, output_mask=mask)
    compiled = CompiledTrunk(m)(ids, output_mask=mask)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", FAMILIES.values(), ids=FAMILIES.keys())
def test_compiled_sampler_equals_eager_and_sees_training(kw):
    """generate(compile=True) on CUDA: mode "reduce-overhead", the decode step replayed as a CUDA
    graph (none skipped), giving eager's greedy tokens and, for a seed, eager's samples; after
    a training step changes the weights in place, the replayed graph reads the new weights."""
    import torch.nn.functional as F
    from torch._dynamo.utils import counters
    torch.backends.cuda.matmul.allow_tf32 = False
    m, prompts = model(kw), ragged(n=11)  # 11 rows: the compiled step pads them to 16
    skips = counters["inductor"]["cudagraph_skips"]
    for _ in range(2):  # the second call replays the graph the first one recorded
        assert generate(m, prompts, 12, temperature=0, compile=True) == generate(m, prompts, 12, temperature=0)
    sampled = [generate(m, prompts, 12, temperature=1.0, top_k=20, seed=5, compile=c) for c in (False, True)]
    assert sampled[0] == sampled[1]
    assert counters["inductor"]["cudagraph_skips"] == skips, "the decode step was not captured"

    opt = torch.optim.AdamW(m.parameters(), lr=3e-2)
    ids = torch.randint(1, 300, (8, 24), device="cuda")
    before = generate(m, prompts, 12, temperature=0, compile=True)[0]
    m.train()
    for _ in range(3):
        F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    after = generate(m, prompts, 12, temperature=0, compile=True)[0]
    assert after == generate(m, prompts, 12, temperature=0)[0] and after != before

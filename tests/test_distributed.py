"""torchrun with 2 CPU processes (gloo) must train exactly what one process trains, with the
weights replicated (DDP) or sharded (FSDP2), and a sharded run must resume. In fp32: bf16
autocast rounds a micro-batch's sums by its shapes, which differ between one process and two."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import hf
import runtime
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# global batch 16 in micro-batches of 4: one process accumulates 4 micro-batches per step,
# each of 2 ranks accumulates 2 and all-reduces once
FAST = ["--model", "tiny", "--n-sft", "512", "--chunk-size", "64", "--n-eval", "48", "--sft-steps", "40",
        "--iterations", "2", "--batch-size", "16", "--micro-batch-size", "4", "--sft-batch-size", "16",
        "--gen-batch-size", "16", "--dtype", "float32"]
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train.run(train.parse_args(FAST + ["--out-dir", str(out)]))
    return out


def torchrun(out, *flags, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "train.py")] + FAST + ["--out-dir", str(out), *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def same_training(one, two):
    a = torch.load(one / "selm_2.pt", weights_only=True)["model"]
    b = torch.load(two / "selm_2.pt", weights_only=True)["model"]
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)
    ra, rb = json.load(open(one / "results.json")), json.load(open(two / "results.json"))
    assert [r["stage"] for r in rb] == ["sft", "dpo", "selm_1", "selm_2"]
    for x, y in zip(ra, rb):  # same greedy answers, same judgements; KL within float noise: its
        # temperature-1 samples invert a CDF, so weights 1e-6 apart can draw another token once
        assert {k: v for k, v in x.items() if k != "kl"} == {k: v for k, v in y.items() if k != "kl"}
        assert abs(x["kl"] - y["kl"]) < 1e-2


@pytest.mark.parametrize("flags,port", [([], 29533), (["--fsdp", "--export", "last"], 29534)], ids=["ddp", "fsdp"])
def test_two_processes_match_one(one, tmp_path, flags, port):
    p = torchrun(tmp_path, *flags, port=port)
    assert p.stdout.count("[ selm_2]") == 1  # only rank 0 reports
    same_training(one, tmp_path)
    evals = [r for r in runtime.read_metrics(tmp_path / "metrics.jsonl") if "eval" in r]
    assert len(evals) == 4  # written once, by rank 0
    if "--export" in flags:  # a sharded run exports what an unsharded one exports
        from hf import read_weights
        (ours,) = hf.export_stages("last", str(one), ["selm_2"])
        theirs = tmp_path / "hf-selm_2"
        assert sorted(os.listdir(theirs)) == sorted(os.listdir(ours))
        assert json.load(open(theirs / "config.json")) == json.load(open(os.path.join(ours, "config.json")))
        a, b = read_weights(ours), read_weights(str(theirs))
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)
        shutil.rmtree(ours)
        shutil.rmtree(theirs)
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(one))


def test_sharded_run_resumes(one, tmp_path):
    """A sharded run cut after its first SELM iteration (its last checkpoint removed, as a kill
    leaves it) resumes under FSDP with activation checkpointing to the same weights."""
    torchrun(tmp_path, "--fsdp", "--iterations", "2", port=29535)
    (tmp_path / "selm_2.pt").unlink()
    rows = json.load(open(tmp_path / "results.json"))
    json.dump(rows[:3], open(tmp_path / "results.json", "w"))
    p = torchrun(tmp_path, "--fsdp", "--activation-checkpointing", "--resume", port=29536)
    assert "continuing after stage selm_1" in p.stdout
    same_training(one, tmp_path)


def test_fsdp_needs_torchrun(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out-dir", str(tmp_path), "--fsdp"])
    assert "torchrun" in str(e.value)


def test_activation_checkpointing_same_loss_and_gradients():
    from model import GPT, preset
    from selm import sequence_logps
    rt = runtime.Runtime(torch.device("cpu"), None, runtime.Ranks(), None, checkpointing=True)
    torch.manual_seed(0)
    plain = GPT(preset("tiny", vocab_size=258, model_type="llama", n_kv_head=1))
    ckpt = GPT(plain.config)
    ckpt.load_state_dict(plain.state_dict())
    rt.prepare(ckpt)
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # same names: checkpoints alike
    ids = torch.randint(0, 258, (4, 24))
    resp = torch.zeros(4, 24, dtype=torch.bool)
    resp[:, 12:] = True
    la, lb = (sequence_logps(m, ids, resp).sum() for m in (plain, ckpt))
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=0)
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=0, msg=n)

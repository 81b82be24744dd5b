"""torchrun with 2 CPU processes (gloo) must train exactly what one process trains."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import runtime
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# global batch 16 in micro-batches of 4: one process accumulates 4 micro-batches per step,
# each of 2 ranks accumulates 2 and all-reduces once
FAST = ["--model", "tiny", "--n-sft", "512", "--chunk-size", "64", "--n-eval", "48", "--sft-steps", "40",
        "--iterations", "2", "--batch-size", "16", "--micro-batch-size", "4", "--sft-batch-size", "16",
        "--gen-batch-size", "16"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train.run(train.parse_args(FAST + ["--out-dir", str(one)]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           os.path.join(ROOT, "train.py")] + FAST + ["--out-dir", str(two)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("[ selm_2]") == 1  # only rank 0 reports
    a = torch.load(one / "selm_2.pt", weights_only=True)["model"]
    b = torch.load(two / "selm_2.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)
    ra, rb = json.load(open(one / "results.json")), json.load(open(two / "results.json"))
    assert [r["stage"] for r in rb] == ["sft", "dpo", "selm_1", "selm_2"]
    for x, y in zip(ra, rb):  # same greedy answers, same judgements; KL within float noise
        assert {k: v for k, v in x.items() if k != "kl"} == {k: v for k, v in y.items() if k != "kl"}
        assert abs(x["kl"] - y["kl"]) < 1e-3
    evals = [r for r in runtime.read_metrics(two / "metrics.jsonl") if "eval" in r]
    assert len(evals) == 4  # written once, by rank 0
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))

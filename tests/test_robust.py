"""Crash safety: kill and resume, determinism, numerical guards, bad checkpoints."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import runtime
import train
from conftest import extra
from files import TMP_PREFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# in bf16 autocast, pinned (auto picks it only on a CPU with bf16 matrix units): every resume test
# below proves a bf16 run resumes byte for byte, on any CPU
FAST = ["--model", "tiny", "--n-sft", "1024", "--chunk-size", "128", "--n-eval", "64",
        "--sft-steps", "120", "--iterations", "2", "--dtype", "bfloat16"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted run: the yardstick for determinism and resume."""
    out = tmp_path_factory.mktemp("ref")
    train.run(train.parse_args(FAST + ["--out-dir", str(out)]))
    return out


def read(path):
    with open(path) as f:
        return f.read()


def eval_rows(out):
    return [r["eval"] for r in runtime.read_metrics(os.path.join(out, "metrics.jsonl")) if "eval" in r]


def test_same_seed_same_results(reference_run, tmp_path):
    train.run(train.parse_args(FAST + ["--out-dir", str(tmp_path)]))
    assert read(tmp_path / "results.json") == read(reference_run / "results.json")
    a, b = torch.load(tmp_path / "selm_2.pt"), torch.load(reference_run / "selm_2.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sigkill_then_resume_gives_identical_results(reference_run, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + FAST + ["--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.time() + 600  # generous: a loaded machine (CI's, or a niced run) is slow to reach sft.pt
    while not (tmp_path / "sft.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.3)  # kill mid-stage, while DPO is running
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "selm_2.pt").exists()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "continuing after stage" in done.stdout
    assert read(tmp_path / "results.json") == read(reference_run / "results.json")
    # the interrupted stage's log lines were cut, not duplicated
    assert eval_rows(tmp_path) == eval_rows(reference_run)
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp-", TMP_PREFIX))]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(reference_run, tmp_path):
    sft_before = read(reference_run / "results.json")
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out-dir", str(tmp_path), "--start-from", str(reference_run / "sft.pt"),
                           "--lr", "1e30"])
    msg = str(e.value)
    assert "non-finite" in msg and "stage dpo" in msg and "step" in msg
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "results.json", "sft.pt"]
    ck = torch.load(tmp_path / "sft.pt", weights_only=True)  # intact and loadable
    assert ck["stage"] == "sft"
    assert read(reference_run / "results.json") == sft_before


def test_corrupted_checkpoint_is_a_clear_error(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    with open(out / "selm_2.pt", "r+b") as f:
        f.truncate(1000)
    before = read(out / "results.json")
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out-dir", str(out), "--resume"])
    assert "selm_2.pt is unreadable" in str(e.value) and "\n" not in str(e.value)
    assert read(out / "results.json") == before


def test_resume_with_another_model_is_a_clear_error(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    with pytest.raises(SystemExit) as e:
        train.main([a if a != "tiny" else "small" for a in FAST] + ["--out-dir", str(out), "--resume"])
    assert "configuration differs" in str(e.value) and "model" in str(e.value)


def test_checkpoints_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "sft.pt"
    torch.save({"model": {}, "model_config": {}, "x": Evil()}, path)
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out-dir", str(tmp_path), "--resume"])
    assert "unreadable" in str(e.value)


def test_out_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--out-dir", str(blocker / "out")])
    assert "is not writable" in str(e.value)


def test_metrics_reader_tolerates_a_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert runtime.read_metrics(p) == [{"a": 1}, {"b": 2}]
    p.write_text('{"a": 1}\n{"b": \n{"c": 3}\n')
    with pytest.raises(ValueError, match=":2: corrupted"):
        runtime.read_metrics(p)


def test_compiled_training_matches_plain(tmp_path):
    """--compile compiles the trunk of the training forward, one graph per stage: the same
    greedy answers, judgements and rewards as the plain run; KL (a log-prob difference of
    slightly different weights) within float noise. In fp32: bf16 rounds a fused graph's
    sums another way, which tips greedy near-ties."""
    import json
    fp32 = FAST[:-1] + ["float32"]
    for name, flags in (("plain", []), ("compiled", ["--compile"])):
        train.run(train.parse_args(fp32 + ["--out-dir", str(tmp_path / name), *flags]))
    plain, compiled = (json.load(open(tmp_path / d / "results.json")) for d in ("plain", "compiled"))
    for a, b in zip(plain, compiled, strict=True):
        assert {k: v for k, v in a.items() if k != "kl"} == {k: v for k, v in b.items() if k != "kl"}
        assert abs(a["kl"] - b["kl"]) < 1e-3


def test_a_moved_run_resumes_however_its_directory_is_spelled(reference_run, tmp_path, monkeypatch):
    """--out-dir names the run being resumed: moved, relative, or through a link, it is the same run."""
    shutil.copytree(reference_run, tmp_path / "moved")
    os.symlink(tmp_path / "moved", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for spelled in ("moved", "link", str(tmp_path / "moved")):
        train.main(FAST + ["--out-dir", spelled, "--resume"])
        assert read(tmp_path / "moved" / "results.json") == read(reference_run / "results.json")


def test_a_full_disk_is_one_line_and_resume_gives_identical_results(reference_run, tmp_path, monkeypatch):
    import errno
    import checkpoint
    save = checkpoint.torch.save

    def disk_full_at_selm_2(obj, f):
        if isinstance(obj, dict) and obj.get("stage") == "selm_2":
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f)
    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_selm_2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # selm_1 and before adopted from the reference run, selm_2 trained
        train.main(FAST + ["--out-dir", str(out), "--start-from", str(reference_run / "selm_1.pt")])
    assert str(e.value) == f"train.py: error: no space left on device writing {out / 'selm_2.pt'}"
    assert sorted(os.listdir(out)) == ["dpo.pt", "metrics.jsonl", "results.json", "selm_1.pt", "sft.pt"]
    monkeypatch.undo()  # space freed
    train.main(FAST + ["--out-dir", str(out), "--resume"])
    assert read(out / "results.json") == read(reference_run / "results.json")


# Run in a child process: train.py, whose export dies (kill -9) half-way through writing the
# weights of its second stage, in the middle of safetensors' own temporary file.
DIE_IN_EXPORT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import safetensors.torch
calls = []
def save_file(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) < 2:
        return real(tensors, filename, metadata=metadata)
    with open(os.path.join(os.path.dirname(filename), ".tmpk1ll3d"), "wb") as f:  # as safetensors names its own
        f.write(bytes(4096))
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
real, safetensors.torch.save_file = safetensors.torch.save_file, save_file
import train
train.main({argv!r})
"""


def test_sigkill_during_export_then_resume(reference_run, tmp_path):
    """kill -9 while --export writes: --resume sweeps what the killed writers left in the export
    folders, exports again, and gives the same results.json."""
    extra("safetensors", "the export writes model.safetensors")
    import hf
    from checkpoint import load_checkpoint
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    argv = FAST + ["--out-dir", str(out), "--resume", "--export", "all"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    killed = subprocess.run([sys.executable, "-c", DIE_IN_EXPORT.format(root=ROOT, argv=argv)], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [n for n in os.listdir(out / "hf-dpo") if n.startswith(TMP_PREFIX)]  # it died mid-write
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + argv, capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read(out / "results.json") == read(reference_run / "results.json")
    assert not [os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files
                if n.startswith((".tmp", TMP_PREFIX))]
    umask = os.umask(0)
    os.umask(umask)
    for stage in ("sft", "dpo", "selm_1", "selm_2"):
        folder = out / f"hf-{stage}"
        assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
        assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
        got = hf.load_pretrained(str(folder)).state_dict()
        want = load_checkpoint(str(out / f"{stage}.pt"))["model"]
        assert all(torch.equal(got[k], want[k]) for k in want)

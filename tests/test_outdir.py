"""The out-dir is the user's: selm removes only what it provably wrote (its own temporary
folders, never through a link), changes nothing before every input is checked, lets one run
at a time into it, and never mixes a new run into another run's stages. The last test walks the
out-dir's states against a fresh run, --resume and --start-from, as test_flags.py walks the flags."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import outdir
import runtime
import train
from files import TMP_PREFIX, atomic_write_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--n-sft", "64", "--chunk-size", "8", "--n-eval", "4", "--sft-steps", "2",
        "--iterations", "1", "--max-new-tokens", "8"]


def run(out, *flags):
    return train.main(FAST + ["--out-dir", str(out), *flags])


def refused(out, *flags):
    """The one line a run into `out` was refused with."""
    with pytest.raises(SystemExit) as e:
        run(out, *flags)
    msg = str(e.value)
    assert msg.startswith("train.py: error: ") and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run, and one of another seed: the stages of 'another run'."""
    out = tmp_path_factory.mktemp("runs")
    run(out / "finished")
    run(out / "other", "--seed", "1")
    return out


def snapshot(root):
    """Every entry under root, links not followed: {relative path: its bytes, its link target, or 'dir'}."""
    seen = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            seen[rel] = ("link", os.readlink(p)) if os.path.islink(p) else "dir" if os.path.isdir(p) else \
                open(p, "rb").read()
    return seen


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def user_files(tmp_path):
    """The issue's files: the user's own .tmp* entries in the out-dir, and a link out of it to a
    folder whose .tmp* entries (and even one of selm's names) are not the run's to touch."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    (out / ".tmp" / "keep").mkdir(parents=True)
    (out / ".tmp" / "keep" / "notes.txt").write_text("mine")
    (out / ".tmp_todo.txt").write_text("mine")
    (out / ".tmp-mine").mkdir()
    (victim / f"{TMP_PREFIX}{dead_pid()}-abc").mkdir(parents=True)
    (victim / ".tmp_keep").write_text("mine")
    os.symlink(victim, out / "hf-mine")
    os.symlink(victim, out / "hf-sft")  # even an export's name, as a link, is not selm's folder
    return out, victim


# ---- 1. the start-up sweep -----------------------------------------------------------------

def test_a_refused_run_deletes_nothing_of_the_users(tmp_path):
    """The issue's case: a run refused for a bad record had already deleted the user's .tmp*
    entries, and followed the hf-mine link to delete the victim's."""
    out, victim = user_files(tmp_path)
    before, outside = snapshot(out), snapshot(victim)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 11 + '{"prompt": "a", "chosen": "b"}\n')
    (tmp_path / "j.py").write_text("def judge(p, c):\n    return [0.0] * len(c)\n")
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    msg = refused(out, "--sft", str(tmp_path / "sft.jsonl"), "--prefs", str(prefs), "--prompts", str(prefs),
                  "--judge", f"{tmp_path}/j.py:judge")
    assert "prefs.jsonl:12: missing field 'rejected'" in msg
    assert snapshot(out) == before and snapshot(victim) == outside


def test_the_sweep_removes_only_selms_own_temporary_folders(tmp_path):
    """A killed writer's temporary folder (selm's name, a dead process's id) goes, in the out-dir
    and in its export folders; a live process's stays, as does every other name, a file of
    selm's name (selm makes folders), and whatever lies behind a link."""
    out, victim = user_files(tmp_path)
    dead, live = f"{TMP_PREFIX}{dead_pid()}-x1", f"{TMP_PREFIX}{os.getpid()}-x2"
    (out / dead).mkdir()
    (out / dead / "sft.pt").write_bytes(b"half")
    (out / "hf-dpo" / dead).mkdir(parents=True)
    (out / "hf-dpo" / dead / ".tmpk1ll3d").write_bytes(b"half")  # safetensors' own, inside selm's folder
    (out / "hf-dpo" / "config.json").write_text("{}")
    (out / live).mkdir()
    (out / f"{TMP_PREFIX}{dead_pid()}-f").write_text("a file")
    os.symlink(victim, out / f"{TMP_PREFIX}{dead_pid()}-l")
    kept = {k: v for k, v in snapshot(out).items() if not k.startswith((dead, f"hf-dpo/{dead}"))}
    outside = snapshot(victim)
    outdir.sweep(str(out))
    assert snapshot(out) == kept and snapshot(victim) == outside


def test_atomic_writes_use_selms_own_temporary_name(tmp_path):
    seen = []
    atomic_write_path(str(tmp_path / "f"), lambda tmp: (seen.append(tmp), open(tmp, "w").close()))
    folder = os.path.basename(os.path.dirname(seen[0]))
    assert folder.startswith(f"{TMP_PREFIX}{os.getpid()}-") and os.listdir(tmp_path) == ["f"]


# ---- 2. nothing changed before every input is checked ---------------------------------------

def test_start_from_and_resume_change_nothing_before_the_judge_is_loaded(finished, tmp_path):
    """--start-from into a finished out-dir with a judge file that does not parse: the line
    names the judge, and not one byte of the out-dir changed (selm_1.pt was deleted and
    results.json rewritten before)."""
    out = tmp_path / "out"
    shutil.copytree(finished / "finished", out)
    before = snapshot(out)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 4)
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "j.py").write_text("def judge(p, c)\n")
    own = ["--sft", str(tmp_path / "sft.jsonl"), "--prefs", str(prefs), "--prompts", str(prefs),
           "--judge", f"{tmp_path}/j.py:judge"]
    for how in (["--start-from", str(finished / "finished" / "dpo.pt")], ["--resume"]):
        msg = refused(out, *own, *how)
        assert "j.py" in msg and "SyntaxError" in msg, msg
        assert snapshot(out) == before


# ---- 3. one run at a time --------------------------------------------------------------------

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
import outdir
lock = outdir.RunLock({out!r})
print("held", flush=True)
time.sleep(600)
"""


def test_one_run_at_a_time_and_a_killed_runs_lock_blocks_nothing(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished / "finished", out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, out=str(out))], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(out)
        for how in ([], ["--resume"], ["--start-from", str(finished / "finished" / "dpo.pt")]):
            msg = refused(out, *how)
            assert f"in use by another run (process {holder.pid} on " in msg, msg
            assert snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(out / outdir.LOCK_FILE)  # the killed holder's file stays; the kernel let go of it
    run(out, "--resume")
    assert not os.path.exists(out / outdir.LOCK_FILE)  # a run that ends removes its own


def test_a_filesystem_without_locks_runs_unlocked(tmp_path, monkeypatch):
    import errno

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(outdir.fcntl, "flock", no_locks)
    lock = outdir.RunLock(str(tmp_path))
    assert lock.fd is None
    lock.release()


def test_only_rank_0_takes_the_lock(tmp_path):
    class Other:  # rank 1 of 2
        main, world = False, 2

        def gather(self, items):
            return items

    with outdir.claim_out_dir(str(tmp_path / "out"), Other()):
        assert not os.path.exists(tmp_path / "out")


# ---- 4. a fresh run never mixes into another run ---------------------------------------------

def test_a_fresh_run_refuses_another_runs_stages(finished, tmp_path):
    """The issue's case: a fresh run into a finished out-dir appended to its metrics.jsonl and
    left its selm_1.pt for a later --resume to continue from."""
    out = tmp_path / "out"
    shutil.copytree(finished / "finished", out)
    os.remove(out / "selm_1.pt")  # any of a run's stages, or its results.json, is a run
    before = snapshot(out)
    msg = refused(out)
    assert "holds another run (sft.pt, dpo.pt, results.json)" in msg and "--resume" in msg, msg
    assert snapshot(out) == before


def test_an_export_never_writes_through_a_link(finished, tmp_path):
    """An export writes config.json and the weights into hf-<stage>/ and deletes weights of
    another format there: through a link, that would be the user's folder."""
    out, victim = user_files(tmp_path)
    shutil.copytree(finished / "finished", out, dirs_exist_ok=True)
    before, outside = snapshot(out), snapshot(victim)
    for how in ([], ["--resume"]):
        msg = refused(out, "--export", "all", *how)
        assert f"--export: {out / 'hf-sft'} is a link" in msg, msg
        assert snapshot(out) == before and snapshot(victim) == outside


def test_a_log_is_selms_if_it_is_empty_or_begins_with_a_row_of_selms(tmp_path):
    """A fresh run starts a run's log again if that run saved no stage; a file of another kind
    under that name is refused, not emptied."""
    log = tmp_path / "metrics.jsonl"
    for text, selms in [("", True), ('{"stage": "sft", "step": 0}\n', True), ('{"offline_pairs": {}}\n', True),
                        ("my notes\n", False), ('{"loss": 1}\n', False), ("[]\n", False)]:
        log.write_text(text)
        assert outdir.selm_log(str(log)) == selms, text
    msg = refused(tmp_path)
    assert "holds a metrics.jsonl that is no log of selm's" in msg and log.read_text() == "[]\n", msg


# ---- 6. a damaged metrics log -----------------------------------------------------------------

def test_resume_refuses_a_shortened_metrics_log_and_pads_nothing(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished / "finished", out)
    os.remove(out / "selm_1.pt")  # resume runs selm_1 again
    log = out / "metrics.jsonl"
    log.write_bytes(log.read_bytes()[:300])
    before = snapshot(out)
    msg = refused(out, "--resume")
    assert "metrics.jsonl is 300 bytes, shorter than the" in msg and "dpo.pt" in msg, msg
    assert snapshot(out) == before and b"\0" not in log.read_bytes()


def test_the_metrics_reader_refuses_nul_bytes(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"a": 1}\n{"b": 2}\n' + bytes(2634) + b'{"c": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: NUL bytes: a damaged log"):
        runtime.read_metrics(p)


# ---- 9. Ctrl-C before the first checkpoint ----------------------------------------------------

def test_ctrl_c_before_the_first_checkpoint_advises_what_works(tmp_path, monkeypatch):
    def interrupt(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_sft", interrupt)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith("train.py: interrupted; ") and "--resume" not in msg, msg
    assert "no stage was saved" in msg and "run the same command again" in msg, msg
    monkeypatch.undo()
    run(tmp_path / "out")  # as it said: the same command again
    assert json.load(open(tmp_path / "out" / "results.json"))[-1]["stage"] == "selm_1"


# ---- the out-dir's states, each against a fresh run, --resume and --start-from ---------------

def state_empty(tmp_path, runs):
    (tmp_path / "out").mkdir()
    return {}


def state_absent(tmp_path, runs):
    return {}


def state_finished(tmp_path, runs):
    shutil.copytree(runs / "finished", tmp_path / "out")
    return {}


def state_interrupted(tmp_path, runs):  # killed during selm_1: its last stage and its lines gone
    shutil.copytree(runs / "finished", tmp_path / "out")
    os.remove(tmp_path / "out" / "selm_1.pt")
    return {}


def state_another_run(tmp_path, runs):
    shutil.copytree(runs / "other", tmp_path / "out")
    return {}


def state_user_files(tmp_path, runs):
    out, _ = user_files(tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "instruction_pairs.jsonl").write_text('{"not": "a cache of this run"}\n')  # a damaged cache
    return {"victim": tmp_path / "victim"}


def state_lone_log(tmp_path, runs):  # killed before its first checkpoint: a log of SFT steps only
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"stage": "sft", "step": 0, "loss": 5.5}\n')
    return {}


def state_stale_lock(tmp_path, runs):  # a killed run's lock file, which nobody holds
    shutil.copytree(runs / "finished", tmp_path / "out")
    (tmp_path / "out" / outdir.LOCK_FILE).write_text(f"{dead_pid()} elsewhere\n")
    return {}


def state_held_lock(tmp_path, runs):
    shutil.copytree(runs / "finished", tmp_path / "out")
    return {"lock": outdir.RunLock(str(tmp_path / "out"))}  # flock: this process's other open file


def state_damaged_log(tmp_path, runs):
    state_interrupted(tmp_path, runs)
    log = tmp_path / "out" / "metrics.jsonl"
    log.write_bytes(log.read_bytes()[:200])
    return {}


OK = "ok"
HOLDS = "holds another run"
STATES = {  # state: (fresh run, --resume, --start-from the finished run's last stage)
    "empty": (OK, "no checkpoint", OK),
    "absent": (OK, "no checkpoint", OK),
    "finished": (HOLDS, OK, HOLDS),
    "interrupted": (HOLDS, OK, HOLDS),
    "another run": (HOLDS, "configuration differs", HOLDS),
    "user files": (OK, "no checkpoint", OK),
    "lone log": (OK, "no stage was saved", OK),
    "stale lock": (HOLDS, OK, HOLDS),
    "held lock": ("in use by another run", "in use by another run", "in use by another run"),
    "damaged log": (HOLDS, "metrics.jsonl is 200 bytes", HOLDS),
}
MODES = {"fresh": [], "resume": ["--resume"], "start-from": ["--start-from", "{runs}/finished/selm_1.pt"]}


@pytest.mark.parametrize("state", STATES)
def test_every_out_dir_state(finished, tmp_path, state):
    for mode, (flags, want) in zip(MODES, zip(MODES.values(), STATES[state])):
        case = tmp_path / mode
        case.mkdir()
        extra = globals()["state_" + state.replace(" ", "_")](case, finished)
        out = case / "out"
        user = {k: v for k, v in snapshot(out).items() if "notes" in k or "tmp" in k or "hf-" in k} \
            if out.exists() else {}
        outside = snapshot(extra["victim"]) if "victim" in extra else None
        before = snapshot(out) if out.exists() else None
        argv = [f.format(runs=finished) for f in flags]
        try:
            if want == OK:
                run(out, *argv)
                assert [r["stage"] for r in json.load(open(out / "results.json"))] == ["sft", "dpo", "selm_1"]
                assert not os.path.exists(out / outdir.LOCK_FILE), (state, mode)
            else:
                msg = refused(out, *argv)
                assert want in msg, (state, mode, msg)
                after = snapshot(out) if out.exists() else None
                if state == "stale lock":  # the one change: a killed run's lock file, selm's own, is gone
                    before.pop(outdir.LOCK_FILE)
                assert after == before, (state, mode)
        finally:
            if "lock" in extra:
                extra["lock"].release()
        assert {k: v for k, v in snapshot(out).items() if k in user} == user, (state, mode)
        assert outside is None or snapshot(extra["victim"]) == outside, (state, mode)

"""Every file selm writes is written whole and readable: through a temporary path and a rename,
with the permissions the umask gives (whatever the writer does with its own temporary files),
and a full disk one line naming the file. What a killed writer leaves is swept at the next start:
tests/test_outdir.py."""
import errno
import os

import pytest
import torch

import checkpoint
import files
import hf
from checkpoint import atomic_save
from files import WriteError, atomic_write, write_json_atomic
from model import GPT, preset
from conftest import extra


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def tiny():
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=61))


def names(folder):
    return sorted(os.listdir(folder))


def test_export_follows_the_umask(tmp_path, umask_027):
    """safetensors writes through a temporary file of its own, made private (0600), and renames
    it over the path it is given: the export must still be readable as the umask says."""
    extra("safetensors", "the export writes model.safetensors")
    hf.save_pretrained(tiny(), str(tmp_path / "hf"))
    assert names(tmp_path / "hf") == ["config.json", "model.safetensors"]  # no temporary file left
    for f in ("config.json", "model.safetensors"):
        assert (tmp_path / "hf" / f).stat().st_mode & 0o777 == umask_027, f


def test_every_atomic_writer_follows_the_umask(tmp_path, umask_027):
    atomic_save({"x": torch.zeros(2)}, str(tmp_path / "a.pt"))
    write_json_atomic([1], str(tmp_path / "b.json"))
    files.atomic_write_path(str(tmp_path / "c.bin"), lambda tmp: os.close(os.open(tmp, os.O_CREAT, 0o600)))
    assert names(tmp_path) == ["a.pt", "b.json", "c.bin"]
    assert all((tmp_path / f).stat().st_mode & 0o777 == umask_027 for f in names(tmp_path))


def full_disk(*args, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def torch_on_a_full_disk(*args, **kw):
    """What torch.save raises when the disk fills: its own RuntimeError, the OSError its context."""
    try:
        full_disk()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def safetensors_on_a_full_disk(*args, **kw):
    raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("writer", [full_disk, torch_on_a_full_disk, safetensors_on_a_full_disk])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, writer):
    path = str(tmp_path / "selm_1.pt")
    monkeypatch.setattr(checkpoint.torch, "save", writer)
    with pytest.raises(WriteError) as e:
        atomic_save({"x": 1}, path)
    assert str(e.value) == f"no space left on device writing {path}" and e.value.errno == errno.ENOSPC
    (tmp_path / "hf").mkdir()
    with pytest.raises(WriteError, match=f"no space left on device writing {tmp_path}/hf/model.safetensors"):
        files.atomic_write_path(str(tmp_path / "hf" / "model.safetensors"), writer)
    assert names(tmp_path) == ["hf"] and names(tmp_path / "hf") == []  # nothing half-written left


def test_other_failures_are_left_as_they_are(tmp_path):
    with pytest.raises(KeyError):
        atomic_write(str(tmp_path / "x.json"), lambda f: {}["missing"], binary=False)
    assert names(tmp_path) == []


def test_a_full_disk_under_the_metrics_log_is_one_line(tmp_path, monkeypatch):
    import builtins

    import runtime
    log = runtime.MetricsLog(str(tmp_path / "metrics.jsonl"))
    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(WriteError) as e:
        log.write({"a": 1})
    assert str(e.value) == f"no space left on device writing {tmp_path / 'metrics.jsonl'}"


def test_a_figure_is_written_whole(tmp_path, monkeypatch):
    """The sweep's and the study's figures go through an atomic write too: a full disk while
    matplotlib writes leaves no half PNG, and says which file."""
    extra("matplotlib", "plots")
    from matplotlib.figure import Figure

    from experiments import plots

    def half_then_full(self, path, **kw):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        full_disk()
    monkeypatch.setattr(Figure, "savefig", half_then_full)
    with pytest.raises(WriteError, match=f"no space left on device writing {tmp_path / 'primary.png'}"):
        plots.primary_endpoint({"H1: D - C": [[0.001, -0.01, 0.012]]}, 1, 0.01, str(tmp_path / "primary.png"))
    assert names(tmp_path) == []

"""plots.py: the sweep's and the study's figures are PNG files when matplotlib is present, and
nothing (with a message naming the package) when it is not."""
import builtins

import pytest

from experiments import plots
from conftest import extra


def draw_both(tmp_path):
    table = {name: {"reward": [0.5, 0.6], "win_rate_vs_reference": [0.4, 0.5]}
             for name in ["offline DPO", "A, iter 1", "A, iter 2", "B, iter 1", "B, iter 2"]}
    plots.sweep_curves("len7-10", table, ["A", "B"], lambda m: m, 2, str(tmp_path / "sweep.png"))
    per_iteration = {"H1: D - C": [[0.001, -0.01, 0.012], [0.0, -0.02, 0.02]]}
    plots.primary_endpoint(per_iteration, 2, 0.01, str(tmp_path / "primary.png"))


def test_figures_are_pngs(tmp_path):
    extra("matplotlib", "plots")
    draw_both(tmp_path)
    for name in ("sweep.png", "primary.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_no_figure_and_a_message(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    draw_both(tmp_path)
    assert not list(tmp_path.iterdir())
    assert "pip install matplotlib" in capsys.readouterr().out

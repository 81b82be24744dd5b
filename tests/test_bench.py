"""bench.py runs: its quick sampling sections and the decode-step profile (figures are not
checked here: timings belong to the benchmark, never to a test)."""
import json

from perf import bench


def test_quick_sampling_and_next_token_sections_run(capsys):
    bench.main(["--quick", "--sections", "sampling,next-token"])
    out = capsys.readouterr().out
    ratios = json.loads(out.strip().splitlines()[-1])["ratios"]
    assert "next token V=1000" in ratios and "small compiled vs eager @32" in ratios


def test_profile_step(capsys):
    bench.main(["--profile-step", "--shapes", "d256"])
    out = capsys.readouterr().out
    assert "decode step profile: d256" in out and "aten::" in out

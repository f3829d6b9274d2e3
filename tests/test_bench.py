"""The benchmark runs end to end on a tiny input (timing itself is not tested here)."""

from __future__ import annotations

import json

import pytest

from visionbatch.cli import main


@pytest.mark.slow
def test_bench_prints_its_lines(tmp_path, capsys):
    """The lines that run in-process or in plain processes; the Ray, seed (a Ray job too)
    and Daft lines are left to benchmark runs: a Ray start-up is most of their time."""
    figures = tmp_path / "bench.json"
    assert main(["bench", "--synthetic", "32", "--vit", "micro", "--ceiling-seconds", "1", "--json", str(figures),
                 "--lines", "ceiling,decode,floor,visionbatch,pipeline"]) == 0
    out = capsys.readouterr().out
    for line in ("1. model-only ceiling", "1c. in-process floor", "2. visionbatch end to end",
                 "4. plain transformers pipeline"):
        assert line in out
    results = json.loads(figures.read_text())
    assert results["images"] == 32 and results["visionbatch"]["rows"] == 32
    assert results["ceiling"]["images_per_s"] > 0 and results["pipeline"]["wall_s"] > 0

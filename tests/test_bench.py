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
    pytest.importorskip("openvino", reason="needs visionbatch[openvino]")
    assert main(["bench", "--synthetic", "32", "--vit", "micro", "--ceiling-seconds", "1", "--json", str(figures),
                 "--lines", "ceiling,decode,floor,visionbatch,pipeline", "--paths", "torch/float32,openvino/f32"]) == 0
    out = capsys.readouterr().out
    for line in ("1. model-only ceiling (torch/float32)", "1-openvino/f32. model-only ceiling", "1c. in-process floor",
                 "2. visionbatch end to end", "4. plain transformers pipeline", "model path, visionbatch: "):
        assert line in out
    results = json.loads(figures.read_text())
    assert results["images"] == 32 and results["visionbatch"]["rows"] == 32
    assert results["ceiling"]["images_per_s"] > 0 and results["pipeline"]["wall_s"] > 0
    assert results["paths"][0]["path"] == "openvino/f32" and results["paths"][0]["images_per_s"] > 0


def test_the_shared_cores_bound_charges_each_image_both_stages():
    """40 images/s from the model on 2 cores (50 ms of a core each) and 200 a core from
    the decoders (5 ms): 55 ms of a core an image, 2 cores: 36.4 images/s."""
    from visionbatch.bench import shared_cores_bound

    assert shared_cores_bound(40.0, 200.0, 2)["images_per_s"] == pytest.approx(2 / 0.055)

"""End to end through the real command (the default engine; Ray where a test says so): parity with
transformers, bad files, the CLI and its exit codes, the model replica's CPU paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import visionbatch
from visionbatch.cli import main
from visionbatch.destination import METRICS_FILE, SUMMARY, read_results
from visionbatch.results import RESULT_SCHEMA


def _reference(model_dir: str, files: list[str]) -> list[dict]:
    from transformers import pipeline

    classifier = pipeline("image-classification", model=model_dir, device="cpu")
    return [out[0] for out in classifier(files, top_k=1, batch_size=16)]


@pytest.mark.parametrize("model_fixture, way", [("tiny_vit", "classify() on Ray"), ("tiny_convnext", "the CLI")])
def test_parity_with_transformers_pipeline(model_fixture, way, sample_dir, request, tmp_path):
    """Each way in: the lazy Ray dataset (``visionbatch.classify``) and the command on its
    default engine, each model against the transformers pipeline."""
    model_dir = request.getfixturevalue(model_fixture)
    if way == "the CLI":
        assert main(["classify", str(sample_dir), "--model", model_dir, "--output", str(tmp_path / "out"), "-q"]) == 0
        rows = read_results(str(tmp_path / "out")).to_pylist()
    else:
        import ray

        try:
            rows = visionbatch.classify([str(sample_dir)], model=model_dir, top_k=5).take_all()
        finally:
            ray.shutdown()  # an idle Ray would take CPU from every later test
    assert len(rows) == 200 and all(r["error"] is None for r in rows)
    ours = {r["path"]: r for r in rows}
    files = sorted(ours)
    reference = _reference(model_dir, files)
    same = sum(ours[f]["label"] == ref["label"] for f, ref in zip(files, reference))
    worst = max(abs(ours[f]["score"] - ref["score"]) for f, ref in zip(files, reference))
    assert same / len(files) >= 0.995, f"top-1 agrees on {same}/{len(files)}"
    assert worst <= 0.01, f"largest score difference {worst}"
    # The scaled head makes scores informative: a parity test on ~uniform scores proves nothing.
    assert max(r["score"] for r in rows) > 0.05


def test_cli_on_sample_images(sample_dir, tiny_vit, tmp_path, capfd):
    dest = tmp_path / "out"
    assert main(["classify", str(sample_dir), "--model", tiny_vit, "--output", str(dest)]) == 0
    table = read_results(str(dest))
    assert table.num_rows == 200 and table.schema == RESULT_SCHEMA
    assert table.column("true_label").null_count == 0
    assert table.column("error").null_count == 200
    assert all(len(labels) == 5 for labels in table.column("top_k_labels").to_pylist())
    out = capfd.readouterr().out
    assert "images found      200" in out and "top-1 accuracy" in out
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["predicted"] == 200 and summary["labelled"] == 200
    assert (dest / METRICS_FILE).exists()


def test_bad_files_get_error_rows(bad_tree, tiny_vit, tmp_path):
    root, expected = bad_tree
    dest = tmp_path / "out"
    summary = visionbatch.run([str(root)], str(dest), model=tiny_vit, progress=False)
    rows = {Path(r["path"]).name: r for r in read_results(str(dest)).to_pylist()}
    assert len(rows) == 7 == summary.images_found
    for name, kind in expected.items():
        assert rows[name]["error"].startswith(kind + ":"), rows[name]["error"]
        assert rows[name]["label"] is None and rows[name]["correct"] is None
    assert rows["huge.png"]["width"] == 30000 and rows["huge.png"]["height"] == 30000
    for name in ("good0.jpg", "good1.jpg", "good2.jpg"):
        assert rows[name]["error"] is None and rows[name]["label"] and rows[name]["true_label"] == "tench, Tinca tinca"
    assert summary.failed == 4 and summary.predicted == 3
    assert summary.errors_by_kind == {"empty_file": 1, "not_an_image": 1, "truncated": 1, "too_large": 1}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_other_formats_and_no_labels(fmt, image_tree, tiny_vit, tmp_path):
    dest = tmp_path / "out"
    summary = visionbatch.run([str(image_tree)], str(dest), model=tiny_vit, format=fmt, labels="none",
                              top_k=3, progress=False)
    table = read_results(str(dest))
    assert table.num_rows == 12 and summary.skipped_non_image == 1
    assert table.column("true_label").null_count == 12 and table.column("correct").null_count == 12
    assert {len(v) for v in table.column("top_k_scores").to_pylist()} == {3}
    assert len(list(dest.glob(f"part-*.{fmt}"))) >= 1


def test_refuses_to_overwrite_unless_asked(image_tree, tiny_vit, tmp_path, capfd):
    dest = str(tmp_path / "out")
    args = ["classify", str(image_tree), "--model", tiny_vit, "--output", dest, "--quiet"]
    assert main(args) == 0
    first = read_results(dest)
    assert main(args) == 1
    assert "already holds results" in capfd.readouterr().err
    assert read_results(dest).equals(first)
    assert main(args + ["--overwrite", "--limit", "5"]) == 0
    assert read_results(dest).num_rows == 5
    assert len(list(Path(dest).glob("part-*"))) == 1  # the old parts are gone


@pytest.mark.parametrize("args,message", [
    (["classify", "{empty}", "--model", "{model}", "--output", "{dest}"], "no image files found"),
    (["classify", "{empty}/missing", "--model", "{model}", "--output", "{dest}"], "source not found"),
    (["classify", "{images}", "--model", "{empty}/no-model", "--output", "{dest}"], "model folder not found"),
    (["classify", "{images}", "--model", "{model}", "--output", "{dest}", "--address", "127.0.0.1:9"],
     "cannot reach the Ray cluster"),
])
def test_failures_exit_non_zero_with_one_line(args, message, image_tree, tiny_vit, tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    values = {"empty": tmp_path / "empty", "model": tiny_vit, "dest": tmp_path / "out", "images": image_tree}
    started = time.monotonic()
    assert main([a.format(**values) for a in args]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("visionbatch: error:")
    log = Path(err[0].rpartition(" (log: ")[2].removesuffix(")"))
    assert "Traceback" in log.read_text(), err[0]  # the line names the log that holds the traceback
    print(f"{message}: exit 1 after {time.monotonic() - started:.1f} s")  # measured, not asserted: a busy machine


def test_corrupt_weights_fail_with_the_reason(image_tree, tiny_vit, tmp_path, capfd):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_vit, broken)
    (broken / "model.safetensors").write_bytes(b"garbage" * 100)
    assert main(["classify", str(image_tree), "--model", str(broken), "--output", str(tmp_path / "o"), "-q"]) == 1
    err = capfd.readouterr().err
    assert "cannot load model" in err and "Traceback" not in err


def test_command_in_a_fresh_process(image_tree, tiny_vit, tmp_path):
    """The installed console script: exit codes, a usage error, and a quiet terminal."""
    exe = Path(sys.executable).with_name("visionbatch")
    usage = subprocess.run([str(exe), "classify", str(image_tree)], capture_output=True, text=True)
    assert usage.returncode == 2 and "--output" in usage.stderr
    done = subprocess.run([str(exe), "classify", str(image_tree), "--model", tiny_vit, "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "predicted         12" in done.stdout
    # Ray's own logging stays in its log files; the terminal gets our progress bar only.
    noise = [line for line in done.stderr.splitlines() if line.strip() and "classify" not in line]
    assert not noise, noise


def test_fastest_batch_size_picks_a_candidate(tiny_vit):
    """The GPU batch-size probe, exercised on CPU (on a GPU it also stops at out-of-memory)."""
    predictor = visionbatch.Predictor(tiny_vit, scale=(1 / 127.5,) * 3, offset=(-1.0,) * 3, device="cpu")
    assert predictor.fastest_batch_size((224, 224), candidates=(1, 2, 4)) in (1, 2, 4)


@pytest.mark.parametrize("needed, kept", [(1e-3, 1), (1e9, 2)])
def test_a_cpu_replica_keeps_to_its_own_cores_when_they_are_fast_enough(tiny_vit, needed, kept):
    """A replica that runs fast enough on its own cores keeps to them; one that would be
    too slow keeps the threads it was given."""
    import torch

    before = torch.get_num_threads()
    try:
        predictor = visionbatch.Predictor(tiny_vit, scale=(1 / 127.5,) * 3, offset=(-1.0,) * 3, device="cpu",
                                          num_threads=2, fewer_threads=(1, needed),
                                          pixel_layout=((224, 224, 3), "|u1"))
        assert predictor.labels.size and torch.get_num_threads() == kept
    finally:
        torch.set_num_threads(before)


def test_packed_linear_layers_give_the_plain_models_outputs_or_are_undone():
    """Packed layers compute what the plain ones did and their own weights are released;
    a layer the probe does not run, or whose weight is not a parameter (pruning), is left
    alone; a model that computes with a layer's weight outside the layer, raising or not,
    is left as it was."""
    import torch
    import torch.nn.utils.prune

    from visionbatch.cpu_tuning import linear_packing_supported, pack_linear_layers

    if not linear_packing_supported():
        pytest.skip("linear layers are packed on x86-64 with oneDNN only")
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)

    class TwoWays(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4, bias=False))
            self.unused = torch.nn.Linear(8, 8)  # as a zero-shot model's text tower, in an image pass
            # its weight set by a forward pre-hook from weight_orig and a mask
            self.pruned = torch.nn.utils.prune.l1_unstructured(torch.nn.Linear(4, 4), "weight", amount=0.5)

        def forward(self, x):
            return self.pruned(self.body(x))

    model = TwoWays().eval()
    with torch.inference_mode():
        plain = model(x)
        assert pack_linear_layers(model, lambda: (model(x), None)) == 2
        assert model.body[0].weight.numel() == 0 and model.body[0].weight.dtype == torch.float32
        assert model.unused.weight.shape == (8, 8) and "forward" not in model.unused.__dict__
        torch.testing.assert_close(model(x), plain)

    class ReadsWeight(torch.nn.Module):
        def __init__(self, fails: bool):
            super().__init__()
            self.fc, self.fails = torch.nn.Linear(8, 8), fails

        def forward(self, x):
            # an empty weight raises in a matmul, and sums to 0 without a word
            return self.fc(x) @ self.fc.weight if self.fails else self.fc(x) + self.fc.weight.sum()

    for fails in (True, False):
        model = ReadsWeight(fails).eval()
        with torch.inference_mode():
            plain = model(x)
            assert pack_linear_layers(model, lambda: (model(x),)) == 0
            assert model.fc.weight.shape == (8, 8) and "forward" not in model.fc.__dict__
            torch.testing.assert_close(model(x), plain)


def test_a_cpu_replica_runs_packed_layers_with_the_plain_models_predictions(tiny_vit):
    """A job's CPU replica (it knows its input's layout) packs every linear layer of the
    model and predicts, scores and embeds as the unpacked model does."""
    import numpy as np
    import torch

    from visionbatch.cpu_tuning import linear_packing_supported

    if not linear_packing_supported():
        pytest.skip("linear layers are packed on x86-64 with oneDNN only")
    arguments = dict(scale=(1 / 127.5,) * 3, offset=(-1.0,) * 3, device="cpu", embedding_width=48)
    packed = visionbatch.Predictor(tiny_vit, pixel_layout=((224, 224, 3), "|u1"), **arguments)
    plain = visionbatch.Predictor(tiny_vit, **arguments)
    linear = sum(type(m) is torch.nn.Linear for m in plain.model.modules())
    assert plain.packed_layers == 0 and packed.packed_layers == linear > 0
    pixels = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    (packed_ids, packed_scores, packed_embeddings, _), (ids, scores, embeddings, _) = (
        packed.predict_pixels(pixels), plain.predict_pixels(pixels))
    assert (packed_ids == ids).all()
    np.testing.assert_allclose(packed_scores, scores, rtol=1e-4)
    np.testing.assert_allclose(packed_embeddings, embeddings, rtol=1e-4, atol=1e-5)


def test_a_model_that_fails_on_every_batch_stops_the_job(image_tree, tmp_path, capfd):
    """Its processor gives 64x64 images to a ViT built for 224x224: every forward pass
    raises. The job stops with the model's own message instead of writing error rows."""
    from conftest import save_random_vit
    from transformers import ViTImageProcessor

    model = save_random_vit(tmp_path / "vit", hidden=48, layers=1, heads=3, mlp=96, seed=0)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(model)
    capfd.readouterr()  # what saving the model printed
    dest = tmp_path / "out"
    started = time.monotonic()
    assert main(["classify", str(image_tree), "--model", model, "--output", str(dest), "--shard-size", "2", "-q"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visionbatch: error: the model fails on every image:"), err
    assert "doesn't match model" in err[0] and "traceback is in /" in err[0]
    log = Path(err[0].split("traceback is in ", 1)[1].split(")", 1)[0])
    assert "Traceback" in log.read_text()
    print(f"stopped after {time.monotonic() - started:.1f} s")  # measured, not asserted: a busy machine
    assert not (dest / "_manifest.json").exists()  # model errors are not results: nothing is committed


def test_model_lanes_run_passes_at_once_and_give_results_in_order():
    """The local engine's lanes: a second forward pass runs while the first does (each
    waits for the other to have started); results come in the blocks' order even where
    the later pass ends first, whose lane meanwhile takes the next block; one lane: the
    next block waits for the result."""
    import threading

    from visionbatch.engines.local import _Lanes

    both_started = threading.Barrier(2, timeout=60)
    may_end = {"first": threading.Event(), "second": threading.Event()}

    def model(block: str) -> str:
        if block in may_end:
            both_started.wait()
            assert may_end[block].wait(60)
        return block.upper()

    lanes = _Lanes(model, 2)
    try:
        lanes.start("first")
        lanes.start("second")
        assert not lanes.free
        may_end["second"].set()
        deadline = time.monotonic() + 60
        while not lanes.free and time.monotonic() < deadline:  # until the second pass has ended
            time.sleep(0.01)
        assert lanes.free  # its lane takes the next block, though its result waits for the first's
        assert list(lanes.results()) == []  # the first is still running: nothing out of order
        may_end["first"].set()
        assert list(lanes.results(wait="all")) == ["FIRST", "SECOND"]
        lanes.width = 1
        lanes.start("third")
        assert not lanes.free
        assert list(lanes.results(wait="lane")) == ["THIRD"] and lanes.free
    finally:  # a failed assertion leaves no pass waiting
        for event in may_end.values():
            event.set()
        both_started.abort()
        lanes.close()


def test_closing_the_lanes_stops_a_pass_in_flight_at_its_next_module():
    """An interrupted job's lanes close: a forward pass in flight stops at its next
    module (a heavy model's pass on one thread would hold the exit for seconds)."""
    import threading

    import torch

    from visionbatch.engines.local import _Lanes, _PassStopped

    layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    started = threading.Event()

    def model(block):
        started.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a long pass: many modules one after another
            layers(torch.zeros(1, 8))
        return "ran to its end"

    lanes = _Lanes(model, 1, layers.modules())
    lanes.start("block")
    assert started.wait(60)
    lanes.close()
    with pytest.raises(_PassStopped):  # not "ran to its end", 60 s later
        list(lanes.results(wait="all"))
    assert layers(torch.ones(1, 8)).shape == (1, 8)  # its hooks are gone with the lanes

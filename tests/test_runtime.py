"""Issue 32: the certified CPU runtime. OpenVINO converts the model's image tower (with
the rewrites it needs, proven equal), a job uses it only once it has agreed with torch
float32 on the job's own images (the bound, not the point estimate), and a wrong or
empty graph is caught and the reference kept."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import save_random_vit, write_image
from visionbatch.certificate import (AGREEMENT, FAILED, PASSED, PENDING, SAMPLE_IMAGES, Certification, Outputs, Trial,
                                     agreement_lower_bound, images_needed)
from visionbatch.driver import HOLD_AFTER_COMMITS

openvino = pytest.importorskip("openvino", reason="needs visionbatch[openvino]")


def _outputs(labels: list[int], classes: int = 10) -> Outputs:
    probs = np.full((len(labels), classes), 0.01, dtype=np.float32)
    probs[np.arange(len(labels)), labels] = 0.91
    return Outputs(probs, None)


def _feed(trial: Trial, images: int, disagree_every: int | None = None, batch: int = 16) -> None:
    """Batches whose top-1 the candidate keeps, but for every ``disagree_every``-th image:
    a near tie (0.46 against 0.45) that the candidate reads the other way, as reduced
    precision does."""
    for start in range(0, images, batch):
        labels = [(start + i) % 10 for i in range(batch)]
        reference, candidate = _outputs(labels), _outputs(labels)
        for i, label in enumerate(labels):
            if disagree_every and (start + i) % disagree_every == disagree_every - 1:
                for outputs, (first, second) in ((reference, (0.46, 0.45)), (candidate, (0.45, 0.46))):
                    outputs.probs[i] = 0.01
                    outputs.probs[i, label], outputs.probs[i, (label + 1) % 10] = first, second
        trial.add(reference, candidate)
        if trial.verdict != PENDING:
            return


def test_a_path_passes_only_once_the_agreements_lower_bound_reaches_the_threshold():
    assert images_needed() == 598
    assert agreement_lower_bound(598, 598) >= AGREEMENT > agreement_lower_bound(597, 597)
    assert agreement_lower_bound(200, 200) < 0.99  # a small sample proves little
    trial = Trial("openvino/f32")
    _feed(trial, 592)  # 37 batches of 16, all agreeing
    assert trial.verdict == PENDING and trial.lower_bound < AGREEMENT
    _feed(trial, 16)
    assert trial.verdict == PASSED and trial.images == 608


@pytest.mark.parametrize("every, fails_by", [(100, 300), (133, 400)])  # 1 in 100; bf16 on Lite0: 6 in 800
def test_a_path_that_moves_one_answer_in_a_hundred_fails_long_before_the_sample_ends(every, fails_by):
    trial = Trial("openvino/bf16")
    _feed(trial, SAMPLE_IMAGES, disagree_every=every)
    assert trial.verdict == FAILED and trial.images <= fails_by, trial
    assert "differ" in trial.reason


def test_moved_scores_and_empty_outputs_fail():
    trial = Trial("openvino/f32")
    reference = _outputs([1, 2])
    moved = Outputs(reference.probs.copy(), None)
    moved.probs[0, 1] -= 0.2
    trial.add(reference, moved)
    assert trial.verdict == FAILED and "score moved by 0.2" in trial.reason
    empty = Trial("openvino/f32")
    empty.add(reference, Outputs(np.zeros((2, 0), np.float32), None))
    assert empty.verdict == FAILED and "shaped (2, 0)" in empty.reason


def test_the_fastest_passing_path_is_chosen_and_an_insisted_one_is_kept_even_when_it_fails():
    certification = Certification(["openvino/bf16", "openvino/f32"], "torch/float32")
    for start in range(0, 640, 16):
        labels = list(range(10)) + list(range(6))
        certification.add(_outputs(labels), {"openvino/bf16": _outputs([(x + 1) % 10 for x in labels]),
                                             "openvino/f32": _outputs(labels)},
                          {"torch/float32": 1.0, "openvino/bf16": 0.2, "openvino/f32": 0.4})
    assert certification.decided and certification.chosen == "openvino/f32"
    assert [trial["verdict"] for trial in certification.figures()["trials"]] == [FAILED, PASSED]
    insisted = Certification(["torch/bfloat16"], "torch/float32", insist=True)
    insisted.add(_outputs([1, 2, 3]), {"torch/bfloat16": _outputs([2, 3, 4])},
                 {"torch/float32": 1.0, "torch/bfloat16": 2.0})
    assert insisted.chosen == "torch/bfloat16"
    insisted = Certification(["torch/bfloat16"], "torch/float32", insist=True)
    insisted.fail("torch/bfloat16", "not loaded: no kernels")
    assert insisted.decided and insisted.chosen is None  # a path that cannot run is never kept


@pytest.mark.parametrize("job_images, speedup, verdict", [(3200, 1.15, FAILED), (3200, 1.3, PASSED),
                                                          (100_000, 1.05, PASSED), (None, 1.02, FAILED)])
def test_a_path_must_pay_for_its_certificate(job_images, speedup, verdict):
    """Certifying costs a path's passes over ~600 images beside the reference's: on a
    3,200-image job a path 1.15x faster would not earn that back (it needs 1.23x); on
    100,000 images it would. (``--runtime auto``; a runtime asked for by name need not pay.)"""
    certification = Certification(["openvino/f32"], "torch/float32", must_pay=True)
    certification.expected_images = lambda: job_images
    for start in range(0, 640, 16):
        labels = [(start + i) % 10 for i in range(16)]
        certification.add(_outputs(labels), {"openvino/f32": _outputs(labels)},
                          {"torch/float32": speedup, "openvino/f32": 1.0})
    (trial,) = certification.figures()["trials"]
    assert trial["verdict"] == verdict and trial["speedup"] == pytest.approx(speedup), trial
    if verdict == FAILED:
        assert trial["images"] < 100 and "paying for its certificate needs" in trial["reason"]
        assert certification.decided and certification.chosen is None


def test_efficientnets_pooler_is_rewritten_converted_and_cached(tmp_path):
    """transformers' EfficientNet pools with a kernel wider than its map: replaced by the
    global average it is, the graph converts and reproduces torch; the second load is the cache's."""
    import torch

    from test_families import save_family
    from visionbatch.model_loading import ModelSource, image_tower, load_model
    from visionbatch.runtime import converted_tower

    folder = save_family("efficientnet", tmp_path / "efficientnet")
    model = load_model(ModelSource(folder, True), dtype=torch.float32)
    tower = image_tower(model, zero_shot=False, embeddings=True)
    probe = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = tower(probe)
    graph, rewrites, came = converted_tower(lambda: tower, probe, weights=folder, description="test")
    assert came.startswith("converted") and rewrites == [
        "model.efficientnet.pooler: AvgPool2d covering its input -> AdaptiveAvgPool2d(1)"]
    compiled = openvino.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    batch = torch.randn(5, 3, 224, 224)  # another batch size: the graph's batch is dynamic
    with torch.inference_mode():
        expected = tower(batch)
    got = list(compiled(batch.numpy()).values())
    assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
    assert all(np.abs(g - e.numpy()).max() < 1e-4 for g, e in zip(got, expected))
    _, _, again = converted_tower(lambda: pytest.fail("a cached graph needs no model"), probe, weights=folder,
                                  description="test")
    assert again == "cache"


def _random_pixels(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)


def _predictor(model: str, runtime: str):
    from visionbatch.predictor import Predictor

    return Predictor(model, scale=(1 / 127.5,) * 3, offset=(-1.0,) * 3, runtime=runtime, batch_size=16,
                     pixel_layout=((224, 224, 3), "|u1"), defer_candidates=True)


@pytest.mark.parametrize("graph", ["another model's", "an empty"])
def test_a_wrong_graph_in_the_cache_fails_the_certificate_and_the_reference_answers(graph, tmp_path):
    """A cached graph is trusted no further than the certificate: a cache that holds
    another model's graph (or one with empty outputs) under this model's key is caught
    on the job's images, and every answer is the reference's."""
    import torch

    from visionbatch.model_loading import ModelSource, image_tower, load_model
    from visionbatch.runtime import converted_tower

    # A model of its own: the cache it poisons is no other test's.
    model = save_random_vit(tmp_path / "model", hidden=48, layers=2, heads=3, mlp=96, seed=0, head_scale=20.0)
    predictor = _predictor(model, "auto")
    assert predictor.paths.wanted and not predictor.paths.started  # started by the job's engine
    if graph == "an empty":
        class Empty(torch.nn.Module):
            def forward(self, pixel_values):
                return (pixel_values.flatten(1)[:, :0],)
        wrong = Empty()
    else:
        other = save_random_vit(tmp_path / "other", hidden=48, layers=2, heads=3, mlp=96, seed=7, head_scale=20.0)
        wrong = image_tower(load_model(ModelSource(other, True), dtype=torch.float32), zero_shot=False,
                            embeddings=False)
    spec = predictor.paths.spec
    converted_tower(lambda: wrong, torch.randn(2, *spec.input_shape), weights=spec.weights,
                    description=spec.description)
    torch_only = _predictor(model, "torch")
    predictor.paths.start()
    assert predictor.paths.wait(120)
    for seed in range(40):
        pixels = _random_pixels(16, seed)
        got, expected = predictor.predict_pixels(pixels), torch_only.predict_pixels(pixels)
        np.testing.assert_array_equal(got[0], expected[0])
        if predictor.paths.certification.decided:
            break
    report = predictor.paths.report()
    assert report["path"] == "torch/float32" and report["certificate"]["decided"]
    # One trial per OpenVINO path this CPU offers (f32; bf16 too where it has AVX-512-BF16
    # or AMX), each running the same poisoned graph: each caught.
    trials = report["certificate"]["trials"]
    assert trials and {trial["path"] for trial in trials} <= {"openvino/f32", "openvino/bf16"}, trials
    for trial in trials:
        assert trial["verdict"] == FAILED and trial["images"] <= 32, trial


def _tree(folder: Path, count: int) -> Path:
    for i in range(count):
        write_image(folder / ("n01440764" if i % 2 else "n02102040") / f"{i:04d}.jpg", size=(40, 30), seed=i)
    return folder


def _classify(images: Path, model: str, dest: Path, *extra: str) -> list[str]:
    """The command line of a job (for the ``start`` fixture: runs.Run)."""
    return ["classify", str(images), "--model", model, "--output", str(dest), "--quiet", "--shard-size", "100", *extra]


def _summary(dest: Path) -> dict:
    return json.loads((dest / "_summary.json").read_text())


def _certificate_committed(job, dest: Path) -> dict:
    """Wait until DEST's manifest records a decided certificate (the job, a ``runs.Run``,
    still running); its runtime."""
    deadline = time.monotonic() + 300
    while True:
        assert job.proc.poll() is None, f"the job ended before its certificate was committed: {job.stderr}"
        assert time.monotonic() < deadline, "no decided certificate in the manifest"
        try:
            runtime = json.loads((dest / "_manifest.json").read_text()).get("runtime") or {}
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet
            runtime = {}
        if (runtime.get("certificate") or {}).get("decided"):
            return runtime
        time.sleep(0.05)


@pytest.mark.slow
def test_a_job_certifies_openvino_on_its_own_images_and_a_resumed_job_keeps_it(tmp_path, start):
    """The first job converts beside itself (it ends first: the reference answers
    throughout, and the conversion finishes for the next job). The second loads the
    cached graph with the model, certifies it on its first images, is interrupted once
    its certificate is committed, and resumes on the certified path without certifying
    again. Its rows are the first job's (torch's) answers."""
    import signal

    from visionbatch.predictor import Predictor
    from visionbatch.runtime import graph_path

    model = save_random_vit(tmp_path / "model", hidden=192, layers=4, heads=3, mlp=768, seed=3, head_scale=20.0)
    images = _tree(tmp_path / "images", 700)  # a certificate is taken only where a job has the images it needs
    # OpenVINO asked for by name: certified, but not held to paying for it (a tiny ViT gains
    # little from OpenVINO; auto would keep torch, see test_a_path_must_pay_for_its_certificate).
    first_run = start(_classify(images, model, tmp_path / "first", "--runtime", "openvino"), tmp_path / "first-run")
    assert first_run.wait(600) == 0, first_run.stderr
    first = _summary(tmp_path / "first")["runtime"]
    assert first["path"] == "torch/float32" and not first["certificate"]["decided"], first
    spec = Predictor(model, scale=(1.0,) * 3, offset=(0.0,) * 3, pixel_layout=((224, 224, 3), "|u1"),
                     runtime="openvino", defer_candidates=True).paths.spec
    cached = Path(graph_path(spec.weights, spec.description, spec.input_shape))
    deadline = time.monotonic() + 300
    while not cached.exists():  # the first job's conversion, finishing on its own
        assert time.monotonic() < deadline, "the conversion never cached its graph"
        time.sleep(0.2)

    # The second job holds once it has committed 1,800 of its 2,000 images (the driver's
    # failpoint), its certificate (~600 images once the cached graph is loaded) decided
    # long before: it is stopped there, running, with work left, however fast the machine.
    # (Stopped without the hold, a job could have ended by the time the manifest showed
    # its certificate: a Ctrl-C then meets a job already on its way out, exit 0.)
    images = _tree(images, 2000)
    dest = tmp_path / "auto"
    # Started as from a terminal (runs.Run): Ctrl-C reaches it, whatever started the suite.
    second = start(_classify(images, model, dest, "--runtime", "openvino"), tmp_path / "second",
                   {HOLD_AFTER_COMMITS: "18"})
    runtime = _certificate_committed(second, dest)
    os.killpg(second.pid, signal.SIGINT)
    assert second.wait(300) == 130, second.stderr
    (trial,) = runtime["certificate"]["trials"]
    assert runtime["path"] == runtime["certificate"]["chosen"] == "openvino/f32", runtime
    assert trial["verdict"] == PASSED and images_needed() <= trial["images"] < 1000
    assert trial["agreement_lower_bound"] >= AGREEMENT and trial["max_score_difference"] < 1e-3
    assert any(note.endswith("cache") for note in runtime["notes"]), runtime["notes"]

    resumed = start([*_classify(images, model, dest, "--runtime", "openvino"), "--resume"], tmp_path / "resumed")
    assert resumed.wait(600) == 0, resumed.stderr[-3000:]
    summary = _summary(dest)
    assert 0 < summary["already_done"] < 2000 and summary["predicted"] == 2000
    assert summary["runtime"]["path"] == "openvino/f32"
    assert summary["runtime"]["certificate"] == runtime["certificate"]  # the first run's, not taken again
    assert json.loads((dest / "_manifest.json").read_text())["job"]["runtime"] == "openvino"
    page = tmp_path / "report.html"
    report = start(["report", dest, "--html", page], tmp_path / "report")
    assert report.wait(300) == 0, report.stderr
    assert "openvino/f32; certificate against torch/float32: openvino/f32 passed on" in page.read_text()
    expected = pq.read_table(tmp_path / "first", columns=["path", "label", "score"]).sort_by("path")
    got = pq.read_table(dest, columns=["path", "label", "score"]).sort_by("path")
    got = got.filter(pc.is_in(got.column("path"), value_set=expected.column("path")))  # the first job's files
    assert got.column("label").to_pylist() == expected.column("label").to_pylist()
    np.testing.assert_allclose(got.column("score").to_numpy(), expected.column("score").to_numpy(), atol=1e-4)


def test_the_paths_a_cpu_job_may_take():
    """auto: OpenVINO at every precision this CPU runs (bf16 first where it has it); an
    explicit reduced dtype: that precision, or f32 with a note where the CPU lacks it;
    torch: a reduced dtype is torch's, float32 is the reference alone."""
    from visionbatch.runtime import candidate_paths, openvino_precisions

    here = openvino_precisions()
    assert here[-1] == "f32"
    assert candidate_paths("auto", "auto", "cpu") == ([f"openvino/{p}" for p in here], [])
    assert candidate_paths("openvino", "float32", "cpu") == (["openvino/f32"], [])
    paths, notes = candidate_paths("auto", "bfloat16", "cpu")
    if "bf16" in here:
        assert (paths, notes) == (["openvino/bf16"], [])
    else:
        assert paths == ["openvino/f32"] and notes == ["OpenVINO has no bf16 kernels for this CPU: f32 instead"]
    assert candidate_paths("torch", "bfloat16", "cpu") == (["torch/bfloat16"], [])
    assert candidate_paths("torch", "auto", "cpu") == ([], [])


@pytest.mark.slow
def test_a_killed_jobs_conversion_dies_with_it(tmp_path, start):
    """kill -9 of the driver mid-conversion: the conversion process exits too (a job that
    ends in order lets it finish instead, see the test above)."""
    import signal

    model = save_random_vit(tmp_path / "model", hidden=192, layers=4, heads=3, mlp=768, seed=4, head_scale=20.0)
    images = _tree(tmp_path / "images", 700)
    job = start(_classify(images, model, tmp_path / "out", "--runtime", "openvino"), tmp_path / "run").proc
    deadline = time.monotonic() + 300
    while not (conversions := [pid for pid in _children(job.pid) if b"visionbatch.runtime" in _cmdline(pid)]):
        assert job.poll() is None, "the job ended before its conversion started"
        assert time.monotonic() < deadline, "no conversion process"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait(60)
    deadline = time.monotonic() + 60
    while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in conversions):
        assert time.monotonic() < deadline, "the conversion outlived its killed job"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rpartition(")")[2].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read()
    except OSError:
        return b""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"

"""Zero-shot classification (CLIP-like models, labels chosen by the user), through the real pipeline."""

from __future__ import annotations

import pytest

import visionbatch
from visionbatch.cli import main
from visionbatch.destination import read_results
from visionbatch.imagenet import imagenet_classes
from visionbatch.errors import JobError


def _sample_labels(sample_dir, count: int) -> list[str]:
    """The first synonyms of the ImageNet names of the sample's first ``count`` folders."""
    names = dict(imagenet_classes())
    return [names[folder.name].split(",")[0] for folder in sorted(sample_dir.iterdir())[:count]]


@pytest.mark.slow
def test_labels_and_scores_match_the_transformers_pipeline(tiny_clip, sample_dir, tmp_path):
    from transformers import pipeline

    labels = _sample_labels(sample_dir, 12)
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(labels) + "\n")
    dest = tmp_path / "out"
    summary = visionbatch.run([str(sample_dir)], str(dest), model=tiny_clip, candidate_labels_file=str(labels_file),
                              top_k=3, embeddings=True, progress=False)
    rows = {row["path"]: row for row in read_results(str(dest)).to_pylist()}
    assert len(rows) == 200 and all(row["error"] is None for row in rows.values())
    assert summary.labelled == 12  # ImageNet folders match the labels by name

    files = sorted(rows)
    classifier = pipeline("zero-shot-image-classification", model=tiny_clip, device="cpu")
    reference = classifier(files, candidate_labels=labels, batch_size=16)
    for path, expected in zip(files, reference):
        row = rows[path]
        assert row["label"] == expected[0]["label"], path
        assert row["top_k_labels"] == [e["label"] for e in expected[:3]], path
        assert row["top_k_scores"] == pytest.approx([e["score"] for e in expected[:3]], abs=1e-4), path
        assert len(row["embedding"]) == 16  # image_embeds: projection_dim wide
    # The scores must depend on the image for the comparison to mean anything.
    assert len({row["label"] for row in rows.values()}) > 1
    assert max(row["score"] for row in rows.values()) - min(row["score"] for row in rows.values()) > 0.3


def test_zero_shot_options_are_checked(tiny_clip, tiny_vit, image_tree, tmp_path, capfd):
    args = ["classify", str(image_tree), "--output", str(tmp_path / "o"), "--quiet"]
    assert main([*args, "--model", tiny_clip, "--candidate-labels", "cat,dog",
                 "--candidate-labels-file", "x.txt"]) == 2
    assert "contradict" in capfd.readouterr().err
    assert main([*args, "--model", tiny_clip, "--candidate-labels", "cat,dog,cat"]) == 2
    assert "more than once: cat" in capfd.readouterr().err
    assert main([*args, "--model", tiny_clip, "--candidate-labels", "cat", "--hypothesis-template", "a photo"]) == 2
    assert "{}" in capfd.readouterr().err
    assert main([*args, "--model", tiny_vit, "--candidate-labels", "cat,dog"]) == 1
    err = capfd.readouterr().err
    assert "needs a zero-shot image classification model" in err and "vit" in err


def test_zero_shot_on_generated_images(tiny_clip, image_tree, tmp_path):
    """The API with a label list; the labels, the template and the embedding options
    are the job's identity: a resume with other labels is refused."""
    dest = str(tmp_path / "out")
    visionbatch.run([str(image_tree)], dest, model=tiny_clip, candidate_labels=["cat", "dog", "car"], top_k=5,
                    progress=False)
    table = read_results(dest)
    assert table.num_rows == 12 and set(table.column("label").to_pylist()) <= {"cat", "dog", "car"}
    assert {len(v) for v in table.column("top_k_labels").to_pylist()} == {3}  # top-k capped by the labels
    assert sum(table.column("top_k_scores").to_pylist()[0]) == pytest.approx(1.0, abs=1e-5)  # softmax
    with pytest.raises(JobError, match="zero_shot: .*'cat', 'dog', 'car'.* there"):
        visionbatch.run([str(image_tree)], dest, model=tiny_clip, candidate_labels="cat,dog", resume=True,
                        progress=False)


def test_siglip_scores_are_sigmoids_as_the_pipeline_gives(sample_dir, tmp_path):
    """SigLIP: per-label sigmoids, text padded to 64 tokens, as transformers' pipeline does."""
    import numpy as np
    import torch
    from transformers import CLIPTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel, pipeline

    from conftest import write_byte_level_tokenizer
    from visionbatch.cpu_tuning import linear_packing_supported
    from visionbatch.decode import decode_batch
    from visionbatch.model_loading import ModelSource, load_processor
    from visionbatch.predictor import Predictor
    from visionbatch.preprocess import choose_preprocessing

    folder = tmp_path / "siglip"
    folder.mkdir()
    vocab_size = write_byte_level_tokenizer(folder)
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = SiglipConfig(text_config=dict(vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=1,
                                           bos_token_id=0, eos_token_id=1, **layers),
                          vision_config=dict(image_size=224, patch_size=32, **layers))
    torch.manual_seed(3)
    model = SiglipModel(config)
    with torch.no_grad():  # spread the sigmoids out
        model.logit_scale.fill_(4.0)
        model.logit_bias.fill_(-1.0)
    model.save_pretrained(folder)
    SiglipImageProcessor().save_pretrained(folder)

    files = [str(p) for p in sorted(sample_dir.glob("*/*"))[:8]]
    labels = ("tench", "goldfish", "cassette player", "church")
    source = ModelSource(str(folder), local_files_only=True)
    spec, _ = choose_preprocessing(load_processor(source))
    batch = decode_batch({"path": np.array(files, dtype=object)}, spec=spec, max_pixels=10**8)
    # Given its input's layout, as a job's replica: the image tower's linear layers are packed, not the text tower's.
    predictor = Predictor(source, scale=spec.scale, offset=spec.offset, device="cpu", dtype="float32",
                          candidate_labels=labels, top_k=4, pixel_layout=((*spec.output_size, 3), "|u1"))
    linear = [m for m in predictor.model.modules() if type(m) is torch.nn.Linear]
    image_tower = [m for m in predictor.model.vision_model.modules() if type(m) is torch.nn.Linear]
    if linear_packing_supported():
        assert predictor.packed_layers == len(image_tower) < len(linear)
        assert all(m.weight.numel() for m in predictor.model.text_model.modules() if type(m) is torch.nn.Linear)
    ours = predictor(batch).to_pydict()
    reference = pipeline("zero-shot-image-classification", model=str(folder), device="cpu")(
        files, candidate_labels=list(labels))
    for top_labels, top_scores, expected in zip(ours["top_k_labels"], ours["top_k_scores"], reference):
        assert top_labels == [e["label"] for e in expected]
        assert top_scores == pytest.approx([e["score"] for e in expected], abs=1e-4)
    assert max(max(s) for s in ours["top_k_scores"]) > 0.5 and sum(ours["top_k_scores"][0]) != pytest.approx(1.0)


def test_a_clip_checkpoint_is_not_taken_as_a_classifier(tiny_clip):
    """Without --candidate-labels a CLIP checkpoint would load as CLIPForImageClassification
    with a random head: refused, with the option to use instead."""
    import torch

    from visionbatch.errors import ModelLoadError
    from visionbatch.model_loading import ModelSource, load_model

    with pytest.raises(ModelLoadError, match=r"classifier\.bias, classifier\.weight.*--candidate-labels"):
        load_model(ModelSource(tiny_clip, local_files_only=True), dtype=torch.float32)
    assert load_model(ModelSource(tiny_clip, local_files_only=True), dtype=torch.float32, zero_shot=True)

"""--embeddings: the vector each classifier's head receives, through the real pipeline."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

import visionbatch
from visionbatch.cli import main
from visionbatch.destination import MANIFEST, read_results
from visionbatch.evaluate import evaluate_dest
from visionbatch.errors import JobError
from visionbatch.report import write_report
from visionbatch.results import EMBEDDING, result_schema


def _head_inputs(model_dir: str, paths: list[str]) -> np.ndarray:
    """What the classification head receives, computed with transformers alone: the
    processor, then the family's backbone output that its head is documented to take."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(paths), 32):
            images = [Image.open(p).convert("RGB") for p in paths[start:start + 32]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            if model.config.model_type == "vit":  # the [CLS] token after the final layer norm
                vectors.append(model.vit(pixel_values=pixels).last_hidden_state[:, 0])
            else:  # ConvNeXt: the pooled, layer-normed feature map
                vectors.append(model.convnext(pixel_values=pixels).pooler_output)
    return torch.cat(vectors).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture,normalize", [("tiny_vit", False), ("tiny_convnext", True)])
def test_embedding_is_the_heads_input(model_fixture, normalize, sample_dir, tmp_path, request):
    model_dir = request.getfixturevalue(model_fixture)
    dest = tmp_path / "out"
    visionbatch.run([str(sample_dir)], str(dest), model=model_dir, embeddings=True, normalize_embeddings=normalize,
                    progress=False)
    table = read_results(str(dest))
    width = {"tiny_vit": 48, "tiny_convnext": 64}[model_fixture]  # hidden_size / hidden_sizes[-1]
    assert table.schema == result_schema(width) and table.num_rows == 200
    assert table.column("error").null_count == 200
    ours = np.array(table.column(EMBEDDING).to_pylist(), dtype=np.float64)
    reference = _head_inputs(model_dir, table.column("path").to_pylist()).astype(np.float64)
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999, f"lowest cosine {cosine.min()}"
    norms = np.linalg.norm(ours, axis=1)
    if normalize:
        assert np.allclose(norms, 1.0, atol=1e-5)
    else:
        assert np.allclose(norms, np.linalg.norm(reference, axis=1), rtol=1e-3)
    job = json.loads((dest / MANIFEST).read_text())["job"]
    assert job["embeddings"] == {"width": width, "normalized": normalize}


@pytest.mark.slow
def test_embeddings_in_every_format_and_on_error_rows(image_tree, tiny_vit, tmp_path):
    """Error rows get a null embedding; CSV and JSON Lines round-trip the column; a
    resume with other embedding options is refused, naming them."""
    (image_tree / "empty.jpg").write_bytes(b"")
    for fmt in ("parquet", "csv", "jsonl"):
        visionbatch.run([str(image_tree)], str(tmp_path / fmt), model=tiny_vit, format=fmt, embeddings=True,
                        progress=False)
        rows = read_results(str(tmp_path / fmt)).to_pylist()
        assert len(rows) == 13
        for row in rows:
            assert (row[EMBEDDING] is None) == (row["error"] is not None)
            assert row[EMBEDDING] is None or len(row[EMBEDDING]) == 48
    parquet = read_results(str(tmp_path / "parquet")).column(EMBEDDING)
    for fmt in ("csv", "jsonl"):
        other = read_results(str(tmp_path / fmt)).column(EMBEDDING)
        assert other.type == pa.list_(pa.float32(), 48) and other.to_pylist() == parquet.to_pylist()
    # evaluate, the report and plain Parquet readers take the extra column in their stride
    assert evaluate_dest(str(tmp_path / "parquet"))["rows"] == 13
    write_report(str(tmp_path / "parquet"), str(tmp_path / "report.html"))
    assert "<html" in (tmp_path / "report.html").read_text()
    assert pads.dataset(tmp_path / "parquet").schema.field(EMBEDDING).type == pa.list_(pa.float32(), 48)
    with pytest.raises(JobError, match=r"embeddings: \{'width': 48, 'normalized': False\} there, None now"):
        visionbatch.run([str(image_tree)], str(tmp_path / "parquet"), model=tiny_vit, resume=True, progress=False)


def test_options_are_checked(image_tree, tiny_vit, tmp_path, capfd):
    assert main(["classify", str(image_tree), "--model", tiny_vit, "--output", str(tmp_path / "o"),
                 "--normalize-embeddings"]) == 2
    assert "--normalize-embeddings needs --embeddings" in capfd.readouterr().err

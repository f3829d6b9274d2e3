"""A finished DEST is a plain dataset: the readers the README names return exactly its result rows,
after every command."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from visionbatch.cli import main
from visionbatch.destination import LABEL_ISSUES, part_glob, read_results
from visionbatch.results import RESULT_SCHEMA

from conftest import WNIDS


def _rows(table_like) -> list[tuple]:
    """(path, label, score, top-k labels, error) per row, sorted by path: what every reader must agree on."""
    columns = [table_like[name] for name in ("path", "label", "score", "top_k_labels", "error")]
    values = [list(column) for column in columns]
    rows = []
    for path, label, score, top_k, error in zip(*values):
        rows.append((path, label, None if score is None or score != score else round(float(score), 6),
                     None if top_k is None else [str(v) for v in top_k], error))
    return sorted(rows)


def datasets_table(dest, cache, *config: str) -> list[dict]:
    """The rows of DEST (or of a ``config`` of it) as Hugging Face datasets loads them."""
    datasets = pytest.importorskip("datasets")
    return datasets.load_dataset(str(dest), *config, split="train", cache_dir=str(cache)).to_list()


def _check_readers(dest, want: list[tuple], cache) -> None:
    """Each reader line of the README returns exactly the result rows ``want`` (``cache``:
    Hugging Face datasets' cache folder)."""
    import pandas

    frame = pandas.read_parquet(dest)
    assert list(frame.columns) == RESULT_SCHEMA.names
    assert _rows(pa.Table.from_pandas(frame, preserve_index=False).to_pydict()) == want  # pandas' nulls, as Arrow's

    dataset = pads.dataset(dest)
    assert dataset.schema == RESULT_SCHEMA
    assert _rows(dataset.to_table().to_pydict()) == want

    polars = pytest.importorskip("polars")
    for glob in (part_glob("parquet"), "*.parquet"):
        assert _rows(polars.read_parquet(f"{dest}/{glob}").to_dict(as_series=False)) == want
        assert _rows(polars.scan_parquet(f"{dest}/{glob}").collect().to_dict(as_series=False)) == want

    duckdb = pytest.importorskip("duckdb")
    for glob in (part_glob("parquet"), "*.parquet"):
        relation = duckdb.sql(f"SELECT * FROM '{dest}/{glob}'")
        assert relation.columns == RESULT_SCHEMA.names
        assert _rows(dict(zip(relation.columns, zip(*relation.fetchall())))) == want
        assert duckdb.sql(f"SELECT count(*) FROM '{dest}/{glob}'").fetchall() == [(len(want),)]

    rows = datasets_table(dest, cache)  # DEST's configs decide, not its _manifest.json
    assert list(rows[0]) == RESULT_SCHEMA.names
    assert _rows({name: [row[name] for row in rows] for name in RESULT_SCHEMA.names}) == want


def test_dest_reads_as_a_plain_dataset_after_every_command(image_tree, tiny_vit, tmp_path):
    (image_tree / WNIDS[0] / "empty.jpg").write_bytes(b"")  # an error row: nulls must read back as nulls
    dest = tmp_path / "out"
    assert main(["classify", str(image_tree), "--model", tiny_vit, "--output", str(dest), "--shard-size", "7",
                 "--quiet", "--report", str(tmp_path / "report.html")]) == 0
    visible = [p.name for p in dest.iterdir() if not p.name.startswith(("_", "."))]
    assert visible and all(name.startswith("part-") and name.endswith(".parquet") for name in visible), visible
    assert {"_manifest.json", "_SUCCESS", "_summary.json"} <= {p.name for p in dest.iterdir()}
    expected = read_results(str(dest)).to_pydict()
    assert len(expected["path"]) == 13 and len(visible) == 2
    want = _rows(expected)
    _check_readers(dest, want, tmp_path / "hf-cache")

    assert main(["evaluate", str(dest)]) == 0
    assert (dest / "_metrics.json").exists()
    _check_readers(dest, want, tmp_path / "hf-cache")

    assert main(["label-issues", str(dest)]) == 0
    assert pq.read_metadata(dest / LABEL_ISSUES).num_rows > 0  # a table the globs would otherwise meet
    _check_readers(dest, want, tmp_path / "hf-cache")

    issues = datasets_table(dest, tmp_path / "hf-cache", "label_issues")
    assert issues == pq.read_table(dest / LABEL_ISSUES).to_pylist()

    assert main(["report", str(dest), "--html", str(tmp_path / "again.html")]) == 0
    assert "Suspected label errors" in (tmp_path / "again.html").read_text()
    _check_readers(dest, want, tmp_path / "hf-cache")

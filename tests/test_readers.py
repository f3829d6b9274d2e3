"""A finished DEST is a plain dataset: common Parquet readers return exactly its result rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from visionbatch.cli import main
from visionbatch.results import RESULT_SCHEMA
from visionbatch.sinks import read_results

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


def test_dest_reads_as_a_plain_dataset(image_tree, tiny_vit, tmp_path):
    (image_tree / WNIDS[0] / "empty.jpg").write_bytes(b"")  # an error row: nulls must read back as nulls
    dest = tmp_path / "out"
    assert main(["classify", str(image_tree), "--model", tiny_vit, "--output", str(dest), "--shard-size", "5",
                 "--quiet", "--report", str(tmp_path / "report.html")]) == 0
    assert main(["evaluate", str(dest)]) == 0
    visible = [p.name for p in dest.iterdir() if not p.name.startswith(("_", "."))]
    assert visible and all(name.startswith("part-") and name.endswith(".parquet") for name in visible), visible
    assert {"_manifest.json", "_SUCCESS", "_summary.json", "_metrics.json"} <= {p.name for p in dest.iterdir()}

    expected = read_results(str(dest)).to_pydict()
    assert len(expected["path"]) == 13 and len(visible) == 3
    want = _rows(expected)

    import pandas

    frame = pandas.read_parquet(dest)
    assert list(frame.columns) == RESULT_SCHEMA.names
    assert _rows(pa.Table.from_pandas(frame, preserve_index=False).to_pydict()) == want  # pandas' nulls, as Arrow's

    dataset = pads.dataset(dest)
    assert dataset.schema == RESULT_SCHEMA
    assert _rows(dataset.to_table().to_pydict()) == want

    polars = pytest.importorskip("polars")
    assert _rows(polars.read_parquet(f"{dest}/*.parquet").to_dict(as_series=False)) == want

    duckdb = pytest.importorskip("duckdb")
    relation = duckdb.sql(f"SELECT * FROM '{dest}/*.parquet'")
    assert relation.columns == RESULT_SCHEMA.names
    assert _rows(dict(zip(relation.columns, zip(*relation.fetchall())))) == want

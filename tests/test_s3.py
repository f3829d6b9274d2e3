"""Reading images from and writing results to a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from visionbatch.cli import main
from visionbatch.destination import read_results


@pytest.fixture
def bucket(s3_server, image_tree):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = f"vb-{abs(hash(str(image_tree))) % 10**8}"
    client.create_bucket(Bucket=name)
    for path in image_tree.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), name, f"val/{path.relative_to(image_tree).as_posix()}")
    return client, name


def test_s3_in_and_out_matches_local(bucket, s3_server, image_tree, tiny_vit, tmp_path, capfd):
    client, name = bucket
    local_dest = tmp_path / "local"
    assert main(["classify", str(image_tree), "--model", tiny_vit, "--output", str(local_dest), "-q"]) == 0
    s3_dest = f"s3://{name}/results/run1"
    assert main(["classify", f"s3://{name}/val/", "--model", tiny_vit, "--output", s3_dest,
                 "--s3-endpoint", s3_server, "-q"]) == 0
    keys = {obj["Key"] for obj in client.list_objects_v2(Bucket=name, Prefix="results/run1/")["Contents"]}
    assert "results/run1/_SUCCESS" in keys and any(k.endswith(".parquet") for k in keys)

    def by_relative_path(table, prefix):
        return {row["path"][len(prefix):]: {k: v for k, v in row.items() if k != "path"} for row in table.to_pylist()}

    remote = by_relative_path(read_results(s3_dest, s3_endpoint=s3_server), f"s3://{name}/val/")
    local = by_relative_path(read_results(str(local_dest)), str(image_tree) + "/")
    assert len(remote) == 12 and remote.keys() == local.keys()
    for key in local:
        assert remote[key]["label"] == local[key]["label"] and remote[key]["true_label"] == local[key]["true_label"]
        assert remote[key]["score"] == pytest.approx(local[key]["score"], abs=1e-5)

    # evaluate and refusing to overwrite work against the bucket too
    assert main(["evaluate", s3_dest, "--s3-endpoint", s3_server]) == 0
    assert "top-1 accuracy" in capfd.readouterr().out
    assert main(["classify", f"s3://{name}/val/", "--model", tiny_vit, "--output", s3_dest,
                 "--s3-endpoint", s3_server, "-q"]) == 1
    assert "already holds results" in capfd.readouterr().err


def test_missing_bucket_is_a_clear_error(s3_server, tiny_vit, tmp_path, capfd):
    assert main(["classify", "s3://no-such-bucket/x/", "--model", tiny_vit, "--output", str(tmp_path / "o"),
                 "--s3-endpoint", s3_server, "-q"]) == 1
    assert "no-such-bucket" in capfd.readouterr().err

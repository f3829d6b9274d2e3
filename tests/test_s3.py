"""A real S3-compatible server on 127.0.0.1: what a job says of a bucket that is not there. S3 in
and out on every engine is in test_engine_contract.py."""

from __future__ import annotations

from visionbatch.cli import main


def test_missing_bucket_is_a_clear_error(s3_server, tiny_vit, tmp_path, capfd):
    assert main(["classify", "s3://no-such-bucket/x/", "--model", tiny_vit, "--output", str(tmp_path / "o"),
                 "--s3-endpoint", s3_server, "-q"]) == 1
    assert "no-such-bucket" in capfd.readouterr().err

"""Inputs for the listing scale tests: N tiny JPEGs in a local folder tree, or on S3.

    python benchmarks/make_tree.py N ROOT [--folders 1000]
    python benchmarks/make_tree.py N s3://BUCKET/PREFIX --endpoint URL [--folders 100] [--threads 8]

Every file holds the same 8x8 JPEG (a few hundred bytes), written with plain os.write
calls: 1,000,000 files take 2-3 minutes of syscalls, with no image encoding (and not
hardlinks: ext4 caps one inode at 65,000 links). Folders are ImageNet class
folders (``n01440764`` ...), N/FOLDERS files each, so ``--labels dirs`` works too.
On S3 the bucket is created if needed and objects are PUT from a thread pool; scale.py
fills its own in-process moto server through moto's backend instead (much faster).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from make_path_list import imagenet_wnids


def tiny_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 80, 40)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def names(n: int, folders: int) -> list[str]:
    """Relative names ``<class folder>/img_<i>.jpg``, i-th file in folder i * folders // n."""
    wnids = imagenet_wnids()
    assert folders <= len(wnids), f"at most {len(wnids)} folders"
    return [f"{wnids[i * folders // n]}/img_{i:09d}.jpg" for i in range(n)]


def make_tree(n: int, root: str, folders: int = 1000) -> None:
    data = tiny_jpeg()
    for folder in imagenet_wnids()[:folders]:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for name in names(n, folders):
        fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)


def _bucket_and_keys(n: int, uri: str, endpoint: str, folders: int, threads: int = 10):
    """A boto3 client, the bucket (created if missing) and the N keys under the prefix."""
    import boto3
    from botocore.config import Config

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    client = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                          config=Config(max_pool_connections=threads))  # one pooled connection per thread
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    return client, bucket, [f"{prefix}/{name}" if prefix else name for name in names(n, folders)]


def upload_s3(n: int, uri: str, endpoint: str, folders: int = 100, threads: int = 8) -> None:
    """PUT N tiny JPEGs under s3://BUCKET/PREFIX/<folder>/ (credentials from the environment).
    Against moto this runs at ~100-150 objects/s on 2 cores whatever the thread count."""
    client, bucket, keys = _bucket_and_keys(n, uri, endpoint, folders, threads)
    data = tiny_jpeg()
    with ThreadPoolExecutor(threads) as pool:
        # list() re-raises the first failed PUT instead of dropping it.
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=data), keys))


def fill_moto_in_process(n: int, uri: str, endpoint: str, folders: int = 100) -> None:
    """The same objects as upload_s3, for a moto server running in this process: written
    straight into moto's backend (~15,000 objects/s instead of ~120 over HTTP, so the
    100,000-object case takes seconds, not a quarter of an hour)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    _, bucket, keys = _bucket_and_keys(n, uri, endpoint, folders)
    backend, data = s3_backends[DEFAULT_ACCOUNT_ID]["global"], tiny_jpeg()
    for key in keys:
        backend.put_object(bucket, key, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="N tiny JPEGs in a local folder tree or under an S3 prefix.")
    parser.add_argument("n", type=int)
    parser.add_argument("root", help="local folder, or s3://BUCKET/PREFIX (with --endpoint)")
    parser.add_argument("--folders", type=int, help="class folders / sub-prefixes (default 1000 local, 100 on S3)")
    parser.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3 endpoint, e.g. moto's URL")
    parser.add_argument("--threads", type=int, default=8, help="parallel PUTs to S3")
    args = parser.parse_args(argv)
    if args.root.startswith("s3://"):
        upload_s3(args.n, args.root, args.endpoint, args.folders or 100, args.threads)
    else:
        make_tree(args.n, args.root, args.folders or 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())

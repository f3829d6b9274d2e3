"""Runtimes: the model's image tower as one graph, run by torch (the reference) or by
OpenVINO (converted once, cached on disk).

'The model's image tower (visionbatch.model_loading.image_tower) is what every runtime computes:
float32 NCHW pixel values in, the model's logits (and the vector its classification head
receives) out, or a zero-shot model's image embeddings. OpenVINO converts that module's graph
(``openvino.convert_model``, TorchScript tracing) and runs it with kernels made for the
CPU it is on (several times torch eager's speed on convolutional models; bf16 on CPUs
with AVX-512 BF16 or AMX). A conversion is kept only where the converted graph gives
the torch module's outputs on a probe batch; the job's certificate (visionbatch.certificate)
then proves it on the job's own images.

Converted graphs are cached under ``$VISIONBATCH_CACHE`` (default
``~/.cache/visionbatch``)/openvino/, keyed by the model's weights (their digest), what
the tower computes, and the versions of OpenVINO and torch; OpenVINO keeps its compiled
blobs there too (its own key covers the CPU). A second job with the same model starts
without converting.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from visionbatch.storage import cache_root, describe

log = logging.getLogger("visionbatch")

REFERENCE = "torch/float32"
REDUCED_DTYPES = ("bfloat16", "float16")
# How far a converted graph's outputs may sit from the torch module's on the probe,
# relative to their largest magnitude: float32 kernels that sum in another order differ
# by ~1e-6 of it (ViT-Ti, EfficientNet-Lite0); a wrong or empty graph by far more.
CONVERSION_TOLERANCE = 1e-3


class RuntimeUnavailable(Exception):
    """A runtime cannot run this model here; the message says why (the job falls back to torch)."""


def openvino_version() -> str:
    """OpenVINO's version, or RuntimeUnavailable where it is not installed."""
    try:
        import openvino
    except ImportError:
        raise RuntimeUnavailable("OpenVINO is not installed (pip install 'visionbatch[openvino]')") from None
    return openvino.__version__


def openvino_precisions() -> list[str]:
    """The precisions OpenVINO runs on this CPU, fastest first (bf16 where the CPU has
    AVX-512 BF16 or AMX, f16 where it has AVX-512 FP16, as OpenVINO reports them)."""
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return [precision for precision in ("bf16", "f16") if precision.upper() in capabilities] + ["f32"]


_OPENVINO_PRECISION = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def candidate_paths(runtime: str, dtype: str, device: str) -> tuple[list[str], list[str]]:
    """The faster paths a job may certify against the reference (torch, float32),
    fastest first, and notes on what was asked for and cannot be had here.

    On CPU, ``auto`` and ``openvino`` take OpenVINO: every precision this CPU runs with
    ``--dtype auto``, the one asked for otherwise (a CPU without it: f32, said). Without
    OpenVINO (or with ``--runtime torch``) a reduced ``--dtype`` is torch's. On a GPU,
    ``auto`` is bf16 where the GPU has it, else fp16 (torch)."""
    import torch

    notes: list[str] = []
    if device != "cpu":
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return ([f"torch/{dtype}"] if dtype in REDUCED_DTYPES else []), notes
    if runtime != "torch":
        try:
            openvino_version()
            here = openvino_precisions()
        except RuntimeUnavailable as err:
            notes.append(f"{err}: torch runs the model")
            log.warning("%s: torch runs the model", err)
        else:
            if dtype == "auto":
                return [f"openvino/{precision}" for precision in here], notes
            asked = _OPENVINO_PRECISION[dtype]
            if asked not in here:
                notes.append(f"OpenVINO has no {asked} kernels for this CPU: f32 instead")
                asked = "f32"
            return [f"openvino/{asked}"], notes
    return ([f"torch/{dtype}"] if dtype in REDUCED_DTYPES else []), notes


class TorchForward:
    """A torch tower in a reduced precision, fed the reference's float32 input."""

    def __init__(self, tower, dtype):
        self.tower, self.dtype = tower, dtype

    def __call__(self, pixel_values) -> tuple:
        import torch

        with torch.inference_mode():
            return tuple(output.float() for output in self.tower(pixel_values.to(self.tower_device, self.dtype)))

    @property
    def tower_device(self):
        return next(self.tower.parameters()).device


def rewrite_for_conversion(model, probe) -> list[str]:
    """Replace what OpenVINO cannot convert by modules proven equal on ``probe``:
    an average pool whose kernel covers its whole input (transformers' EfficientNet
    pools a 7x7 map with a 1280-wide kernel and ceil_mode; one conversion route fails on
    it, another returns an empty output) becomes the global average it is. Returns what
    was rewritten; nothing where the outputs would move."""
    import torch

    pools: dict[str, tuple] = {}  # name -> the input's spatial shape

    def record(name, module, args, output) -> None:  # a hook that returns something replaces the output
        pools[name] = args[0].shape[-2:]

    hooks = [module.register_forward_hook(functools.partial(record, name))
             for name, module in model.named_modules() if type(module) is torch.nn.AvgPool2d]
    try:
        with torch.inference_mode():
            before = model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    covering = []
    for name, shape in pools.items():
        pool = model.get_submodule(name)
        kernel = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size,) * 2
        if pool.padding in (0, (0, 0)) and kernel[0] >= shape[0] and kernel[1] >= shape[1]:
            covering.append(name)
    if not covering:
        return []
    originals = {name: model.get_submodule(name) for name in covering}
    for name in covering:
        _set_submodule(model, name, torch.nn.AdaptiveAvgPool2d(1))
    with torch.inference_mode():
        after = model(probe)
    if not all(_close(a, b, 1e-5) for a, b in zip(after, before, strict=True)):
        for name, module in originals.items():
            _set_submodule(model, name, module)
        return []
    return [f"{name}: AvgPool2d covering its input -> AdaptiveAvgPool2d(1)" for name in covering]


def _set_submodule(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _close(got, expected, tolerance: float) -> bool:
    got, expected = np.asarray(got, dtype=np.float32), np.asarray(expected, dtype=np.float32)
    if got.shape != expected.shape or got.size == 0:
        return got.shape == expected.shape and got.size == expected.size
    return float(np.abs(got - expected).max()) <= tolerance * max(1.0, float(np.abs(expected).max()))


def _cache_key(weights: str, tower: str, input_shape: tuple[int, ...]) -> str:
    import torch

    text = "\0".join([weights, tower, str(input_shape), openvino_version(), torch.__version__, platform.machine()])
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def graph_path(weights: str, description: str, input_shape: tuple[int, ...]) -> str:
    """Where the converted graph of a tower is cached."""
    return os.path.join(cache_root(), "openvino", _cache_key(weights, description, input_shape), "model.xml")


def converted_tower(make_tower: Callable, probe, *, weights: str, description: str) -> tuple:
    """The OpenVINO graph of the tower ``make_tower()`` builds (a torch module of float32
    weights; built only where the cache misses) for inputs shaped like ``probe`` (any
    batch): from the cache, else converted, checked on the probe and cached. Returns (openvino.Model, what was rewritten, where it came from:
    "cache" or "converted in N s"). RuntimeUnavailable where it does not convert or does
    not reproduce the module."""
    import openvino
    import torch

    input_shape = tuple(probe.shape[1:])
    path = graph_path(weights, description, input_shape)
    folder = os.path.dirname(path)
    core = openvino.Core()
    if os.path.exists(path):
        return core.read_model(path), [], "cache"
    started = time.perf_counter()
    tower = make_tower()
    rewrites = rewrite_for_conversion(tower, probe)
    with torch.inference_mode():
        expected = [output.numpy() for output in tower(probe)]
    try:
        with torch.no_grad():
            model = openvino.convert_model(tower, example_input=probe,
                                           input=[openvino.PartialShape([-1, *input_shape])])
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = [np.asarray(value) for value in compiled(probe.numpy()).values()]
    except Exception as err:
        raise RuntimeUnavailable(
            f"OpenVINO cannot convert this model: {type(err).__name__}: {describe(err)}") from None
    if len(got) != len(expected) or not all(_close(g, e, CONVERSION_TOLERANCE) for g, e in zip(got, expected)):
        differences = [float(np.abs(g - e).max()) if g.shape == e.shape and g.size else float("inf")
                       for g, e in zip(got, expected)]
        raise RuntimeUnavailable("OpenVINO's conversion does not reproduce the model on a probe batch "
                                 f"(outputs {[g.shape for g in got]} against {[e.shape for e in expected]}, "
                                 f"largest differences {differences})")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".converting-")
    try:
        openvino.save_model(model, os.path.join(staging, "model.xml"), compress_to_fp16=False)
        try:
            os.rename(staging, folder)  # whole or not at all; another job may have won the race
        except OSError:
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model, rewrites, f"converted in {time.perf_counter() - started:.1f} s"


@dataclass(frozen=True)
class Loaded:
    """A candidate path ready to run, and how it came to be."""

    path: str  # e.g. "openvino/f32"
    forward: object  # pixel_values (torch float32 NCHW) -> tuple of torch tensors
    note: str


class OpenVINOForward:
    """A converted tower compiled for this CPU at one precision, callable from several
    threads at once (an infer request per thread; OpenVINO lets go of the GIL while it
    runs). ``streams``: passes that may run at once, one thread each, as the local
    engine's lanes run them."""

    def __init__(self, model, precision: str, streams: int, threads: int):
        import openvino

        core = openvino.Core()
        core.set_property({"CACHE_DIR": os.path.join(cache_root(), "openvino", "compiled")})
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": streams * threads,
            # The decoders share these cores: pinned threads would wait for a core a decoder holds.
            "ENABLE_CPU_PINNING": False})
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        if ran != precision:
            raise RuntimeUnavailable(f"OpenVINO runs {ran} here where {precision} was asked")
        # OpenVINO's bindings set up numpy's API at the first tensor .data of the process,
        # under a once-lock that deadlocks (with the GIL) when two threads' first passes
        # race for it: 3 of 30 fresh processes hung so, two lanes' first infer at once
        # (the local engine, `visionbatch bench`). Set up here, on this one thread.
        openvino.Tensor(np.zeros(1, dtype=np.float32)).data
        self._requests = threading.local()

    def __call__(self, pixel_values) -> tuple:
        import torch

        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        request.infer([pixel_values.numpy()])
        # Copies: the request's output buffers are reused by its next pass.
        return tuple(torch.from_numpy(np.array(request.get_output_tensor(i).data))
                     for i in range(len(self.compiled.outputs)))


@dataclass(frozen=True)
class TowerSpec:
    """What a conversion process needs to build a model's tower on its own (plain values)."""

    model: str
    local_files_only: bool
    allow_pickle: bool
    trust_remote_code: bool
    zero_shot: bool
    embeddings: bool
    input_shape: tuple[int, ...]  # one image's pixel values, (C, H, W)
    weights: str  # the cache key's names for the weights and the tower
    description: str


# What a job that ends in order tells its conversion process: go on, cache the graph.
_DETACH = "detach\n"


class Conversion:
    """A tower converted in a process of its own (``python -m visionbatch.runtime``):
    tracing holds the GIL for seconds and a converter may crash, neither of which the
    job's process should take. One that outlives a job ending in order (``detach``)
    finishes and caches the graph for the next; one whose job was killed (its stdin
    closed without the word) exits at once, as the job's other processes do."""

    def __init__(self, spec: TowerSpec):
        import dataclasses
        import json
        import subprocess
        import sys

        # Files, not pipes: a process that outlives its job must not die writing to a
        # pipe nobody reads (tracing warns on stderr).
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "visionbatch.runtime", json.dumps(dataclasses.asdict(spec))],
            stdin=subprocess.PIPE, stdout=self.stdout, stderr=self.stderr, text=True)

    def detach(self) -> None:
        """Let the conversion finish after this process ends."""
        try:
            self.process.stdin.write(_DETACH)
            self.process.stdin.close()
        except (OSError, ValueError):  # it ended already, or was detached
            pass

    def result(self) -> tuple[list[str], str]:
        """(rewrites, where the graph came from); RuntimeUnavailable where it did not convert."""
        import json

        self.process.wait()
        self.stdout.seek(0)
        self.stderr.seek(0)
        lines, errors = self.stdout.read().strip().splitlines(), self.stderr.read().strip().splitlines()
        if self.process.returncode != 0 or not lines:
            why = (errors or [f"exit status {self.process.returncode}"])[-1]
            raise RuntimeUnavailable(f"the conversion process failed: {why[:300]}")
        answer = json.loads(lines[-1])
        if "error" in answer:
            raise RuntimeUnavailable(answer["error"])
        return answer["rewrites"], answer["came"]


def _convert(spec: TowerSpec) -> dict:
    """In the conversion process: the tower built from the weights, converted and cached."""
    import torch

    from visionbatch.model_loading import ModelSource, image_tower, load_model

    def make_tower():
        model = load_model(ModelSource(spec.model, spec.local_files_only), dtype=torch.float32,
                           allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code,
                           zero_shot=spec.zero_shot)
        return image_tower(model, zero_shot=spec.zero_shot, embeddings=spec.embeddings)

    probe = torch.randn(2, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    try:
        _, rewrites, came = converted_tower(make_tower, probe, weights=spec.weights, description=spec.description)
    except RuntimeUnavailable as err:
        return {"error": str(err)}
    return {"rewrites": rewrites, "came": came}


def load_openvino(spec: TowerSpec, *, precisions: list[str], streams: int, threads: int,
                  started: Callable[[Conversion], None]) -> list[Loaded]:
    """The OpenVINO candidates for a tower, one per precision, in their order: its graph
    from the cache, else converted first (``started`` is given the conversion);
    RuntimeUnavailable where it does not convert."""
    import openvino

    path = graph_path(spec.weights, spec.description, spec.input_shape)
    rewrites, came = [], "cache"
    if not os.path.exists(path):
        conversion = Conversion(spec)
        started(conversion)
        rewrites, came = conversion.result()
    model = openvino.Core().read_model(path)
    note = f"OpenVINO {openvino_version()}, {came}" + (f"; rewrote {'; '.join(rewrites)}" if rewrites else "")
    return [Loaded(f"openvino/{precision}", OpenVINOForward(model, precision, streams, threads), note)
            for precision in precisions]


class ModelPaths:
    """A model replica's faster paths (``wanted``, fastest first, from candidate_paths, or
    the one a resumed job certified): loading them (``start``), the certificate that
    decides which one rows come from (``certify``, fed by the replica's passes from any
    thread), and what to report. ``reference``: the torch float32 forward; ``spec``: the
    tower, for OpenVINO; ``fresh_tower(dtype)``: another copy of it in a torch dtype."""

    def __init__(self, wanted: list[str], *, reference: Callable, spec: TowerSpec | None,
                 fresh_tower: Callable, streams: int, certify: bool, insist: bool, must_pay: bool,
                 notes: list[str]):
        from visionbatch.certificate import Certification

        self.wanted, self.reference, self.spec = wanted, reference, spec
        self._fresh_tower, self._streams = fresh_tower, streams  # passes at once: the local engine's lanes
        self.certification = Certification(wanted, REFERENCE, insist, must_pay) if wanted and certify else None
        self.notes = notes
        self.loaded: dict[str, Callable] = {}  # path -> forward, once loaded
        self.started = False
        self.deferred = ""  # why they were never started, where an engine chose not to
        self._done = threading.Event()
        self._conversions: list[Conversion] = []

    def close(self) -> None:
        """The job ends in order: a conversion still running finishes, for the next job."""
        for conversion in self._conversions:
            conversion.detach()

    def start(self, expected_images: Callable[[], int | None] | None = None) -> None:
        """Load the paths: at once where they are OpenVINO graphs already converted (read
        and compiled in ~0.5 s), else in a thread of their own (a conversion takes
        seconds, in a process of its own): the reference's passes go on meanwhile, and
        their rows are the job's until a path is certified. Once only. A conversion still
        running when the job ends finishes on its own, for the next job.
        ``expected_images()``: the job's size so far (a path must pay for its certificate)."""
        if not self.wanted or self.started:
            return
        self.started = True
        if self.certification and expected_images:  # the job's size: what a path must gain to pay for it
            self.certification.expected_images = expected_images
        if all(path.startswith("openvino/") for path in self.wanted) and os.path.exists(
                graph_path(self.spec.weights, self.spec.description, self.spec.input_shape)):
            self._load()
        else:
            threading.Thread(target=self._load, daemon=True, name="visionbatch-paths").start()

    def wait(self, timeout: float) -> bool:
        """Whether the paths are loaded (or failed to load) within ``timeout`` s."""
        return self._done.wait(timeout)

    def _load(self) -> None:
        import torch

        loaded: dict[str, Callable] = {}
        for runtime in dict.fromkeys(path.partition("/")[0] for path in self.wanted):
            paths = [path for path in self.wanted if path.startswith(runtime + "/")]
            try:
                if runtime == "openvino":
                    for candidate in load_openvino(self.spec, precisions=[path.partition("/")[2] for path in paths],
                                                   # each on the replica's torch threads (torch's count is per process)
                                                   streams=self._streams, threads=torch.get_num_threads(),
                                                   started=self._conversions.append):
                        loaded[candidate.path] = candidate.forward
                        self.notes.append(f"{candidate.path}: {candidate.note}")
                else:
                    for path in paths:
                        dtype = getattr(torch, path.partition("/")[2])
                        loaded[path] = TorchForward(self._fresh_tower(dtype), dtype)
            except Exception as err:  # RuntimeUnavailable, or a model this runtime cannot run: the reference stays
                why = str(err) if isinstance(err, RuntimeUnavailable) else f"{type(err).__name__}: {describe(err)}"
                self.notes.append(f"{runtime}: not used: {why}")
                log.warning("%s is not used: %s", runtime, why)
                for path in paths:
                    if self.certification:
                        self.certification.fail(path, f"not loaded: {why}")
        self.loaded = loaded
        self._done.set()

    def forward_now(self) -> Callable | None:
        """The forward pass rows come from now: a certified (or resumed) path once
        loaded, else the reference; None while a certificate is being taken."""
        if self.certification is None:
            return self.loaded.get(self.wanted[0], self.reference) if self.wanted else self.reference
        if not self.certification.decided:
            return None
        return self.loaded.get(self.certification.chosen, self.reference)

    @property
    def runs_openvino(self) -> bool:
        """Whether OpenVINO runs passes now: the rows' path, or one being certified."""
        forward = self.forward_now()
        if forward is None:  # certifying: the reference's pass and the candidates'
            return any(isinstance(self.loaded.get(path), OpenVINOForward) for path in self.certification.pending)
        return isinstance(forward, OpenVINOForward)

    def certify(self, pixel_values, on_host: Callable) -> tuple:
        """A pass while the certificate is taken: the reference's outputs (the rows),
        compared with each loaded path's on the same input (``on_host``: outputs -> Outputs)."""
        started = time.perf_counter()
        reference = self.reference(pixel_values)
        seconds = {REFERENCE: time.perf_counter() - started}
        tried = {}
        for path in self.certification.pending:
            if path in self.loaded:
                started = time.perf_counter()
                try:
                    outputs = self.loaded[path](pixel_values)
                except Exception as err:  # a path that fails on the job's images fails its certificate
                    self.certification.fail(path, f"it failed on the job's images: {type(err).__name__}: "
                                                  f"{describe(err)}")
                    continue
                seconds[path] = time.perf_counter() - started
                tried[path] = on_host(outputs)
        if tried:
            self.certification.add(on_host(reference), tried, seconds)
        return reference

    def report(self) -> dict:
        """The path rows come from now, the certificate's figures (where one was taken)
        and notes (a runtime missing, where a graph came from, why none was tried)."""
        forward = self.forward_now()
        path = next((p for p, f in self.loaded.items() if f is forward), REFERENCE)
        taken = self.certification is not None and self.started
        return {"path": path, "notes": self.notes + ([self.deferred] if self.deferred else []),
                "certificate": self.certification.figures() if taken else None}


if __name__ == "__main__":
    import json
    import sys

    logging.disable(logging.WARNING)

    def exit_with_the_job() -> None:  # the job's end closes stdin: without the word it was killed
        if sys.stdin.readline() != _DETACH:
            os._exit(1)

    threading.Thread(target=exit_with_the_job, daemon=True).start()
    arguments = json.loads(sys.argv[1])
    print(json.dumps(_convert(TowerSpec(**{**arguments, "input_shape": tuple(arguments["input_shape"])}))))

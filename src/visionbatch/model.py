"""Model: load a Hugging Face image classifier safely, and run it on batches.

:class:`Predictor` is the model stage. It is a plain callable over numpy batches
(usable in anyone's ``map_batches``): it loads the model once, takes uint8 pixels at
the model's input size, applies the rescale/normalise affine on its device, runs the
forward pass under ``torch.inference_mode`` in the chosen dtype, and returns top-k
labels and scores as small arrays.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import traceback
import urllib.parse
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visionbatch.results import MODEL_TRACEBACK, PREDICTION_FIELDS


class ModelLoadError(Exception):
    """The model (or its preprocessor) cannot be loaded; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, decided once in the driver and reused by every worker."""

    ref: str
    local_files_only: bool


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    parsed = urllib.parse.urlparse(constants.ENDPOINT)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_source(ref: str) -> ModelSource:
    """Decide, within seconds, whether ``ref`` can be loaded, and how.

    transformers retries an unreachable hub for about half a minute before failing;
    a quick connection probe (and a look in the local cache) lets us fail fast with
    a message that says what to do instead.
    """
    expanded = os.path.expanduser(ref)
    if os.path.isdir(expanded):
        return ModelSource(os.path.abspath(expanded), local_files_only=True)
    if ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"model folder not found: {ref}")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(ref, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelLoadError(f"HF_HUB_OFFLINE is set and model {ref!r} is not in the local cache "
                                 f"({constants.HF_HUB_CACHE}); pass a local folder with --model PATH")
        return ModelSource(ref, local_files_only=True)
    if hub_reachable():
        return ModelSource(ref, local_files_only=False)
    if cached:
        return ModelSource(ref, local_files_only=True)
    raise ModelLoadError(
        f"cannot load model {ref!r}: the Hugging Face hub ({constants.ENDPOINT}) is unreachable and the "
        "model is not in the local cache. Pass a local folder holding a save_pretrained model "
        "(--model PATH; `visionbatch models make-efficientnet-lite0 DIR` writes one offline), or "
        "pre-download it where the hub is reachable and set HF_HUB_OFFLINE=1."
    )


_SAMPLE_BYTES = 1 << 20


def model_revision(source: ModelSource) -> str | None:
    """Which weights ``source`` names, for a job's identity: a hub model's commit (from
    the cache's snapshot folder), or for a local folder a hash of its files' names,
    sizes and first and last MiB (new weights change all of these; gigabytes are not read)."""
    if not os.path.isdir(source.ref):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.ref, "config.json")
        return os.path.basename(os.path.dirname(cached)) if isinstance(cached, str) else None
    digest = hashlib.blake2b(digest_size=8)
    for entry in sorted(os.scandir(source.ref), key=lambda entry: entry.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        size = entry.stat().st_size
        digest.update(f"{entry.name}\0{size}\0".encode())
        with open(entry.path, "rb") as file:
            head = file.read(_SAMPLE_BYTES)
            if size > 2 * _SAMPLE_BYTES:
                file.seek(-_SAMPLE_BYTES, os.SEEK_END)
            digest.update(head + file.read())  # the rest, or the last MiB
    return digest.hexdigest()


def load_processor(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(
            source.ref, local_files_only=source.local_files_only, trust_remote_code=trust_remote_code
        )
    except Exception as err:
        raise ModelLoadError(f"cannot load the image processor of {source.ref}: {_first_line(err)}"
                             f"{_remote_code_hint(err)}") from None


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.ref, local_files_only=source.local_files_only, trust_remote_code=trust_remote_code
        )
    except Exception as err:
        raise ModelLoadError(f"cannot load the config of {source.ref}: {_first_line(err)}"
                             f"{_remote_code_hint(err)}") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA GPU")
    return device


def resolve_dtype(dtype: str, device: str):
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(source: ModelSource, *, dtype, allow_pickle: bool = False, trust_remote_code: bool = False):
    """AutoModelForImageClassification with safetensors only (unless allowed) and SDPA where supported."""
    from transformers import AutoModelForImageClassification

    kwargs = dict(
        local_files_only=source.local_files_only,
        trust_remote_code=trust_remote_code,
        # Pickled .bin weights can run code on load: refuse them unless asked.
        use_safetensors=None if allow_pickle else True,
        dtype=dtype,
    )
    try:
        try:
            model = AutoModelForImageClassification.from_pretrained(source.ref, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError) as err:
            if "sdpa" not in str(err).lower() and "attn" not in str(err).lower():
                raise
            model = AutoModelForImageClassification.from_pretrained(source.ref, **kwargs)
    except Exception as err:
        hint = ""
        if not allow_pickle and ("safetensors" in str(err).lower() or "model.safetensors" in str(err)):
            hint = " (only safetensors weights are loaded; pass --allow-pickle to load .bin weights you trust)"
        raise ModelLoadError(f"cannot load model {source.ref}: {_first_line(err)}{hint}") from None
    return model.eval()


def _remote_code_hint(err: Exception) -> str:
    """transformers names its own argument on a second line that _first_line drops."""
    if "trust_remote_code" in str(err) or "contains custom code" in str(err):
        return " (pass --trust-remote-code to run the model's own code; only for models you trust)"
    return ""


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:400]


class Predictor:
    """The model stage: batches of preprocessed images in, top-k predictions out.

    A batch is a dict of numpy arrays (``pixels`` (N, H, W, 3) uint8 and ``error``, ""
    or None where the image decoded), or a pipeline block: a pyarrow Table whose
    ``pixels`` binary column holds each image's bytes in ``pixel_layout`` (empty for a
    failed row). Every other column passes through ("" in numpy string columns becomes
    null). The forward pass runs ``batch_size`` images at a time; rows with an error get
    null predictions. Output: a pyarrow Table with the passed-through columns plus
    label, label_id, score, top_k_labels, top_k_scores, ``predict_seconds`` (this call's
    time, shared per row) and, where a ``true_label`` column exists, ``correct``. If
    the model itself fails on a batch, its rows get ``model_error`` rows instead.
    """

    def __init__(
        self,
        model: str | ModelSource,
        *,
        scale: tuple[float, float, float],
        offset: tuple[float, float, float],
        top_k: int = 5,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        compile: bool = False,
        batch_size: int | None = None,
        pixel_layout: tuple[tuple[int, ...], str] | None = None,
    ):
        import torch

        source = model if isinstance(model, ModelSource) else resolve_model_source(model)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(resolve_device(device))
        self.dtype = resolve_dtype(dtype, self.device.type)
        self.model = load_model(source, dtype=self.dtype, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code).to(self.device)
        config = self.model.config
        self.labels = np.array([config.id2label.get(i, str(i)) for i in range(config.num_labels)], dtype=object)
        # The reference pipeline's rule: sigmoid for multi-label or single-logit heads.
        self.sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1
        self.top_k = min(top_k, config.num_labels)
        self.scale = torch.tensor(scale, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.offset = torch.tensor(offset, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.forward = torch.compile(self.model) if compile else self.model
        self.batch_size = batch_size
        self.pixel_layout = pixel_layout  # (shape, dtype) of one image in a pipeline block

    def predict_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) uint8, or (N, C, H, W) float32 already preprocessed (the slow
        path) -> (top-k class ids, top-k scores), each (N, k)."""
        import torch

        with torch.inference_mode():
            host = torch.from_numpy(np.ascontiguousarray(pixels))
            if self.device.type == "cuda":
                host = host.pin_memory()
            x = host.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:  # NHWC uint8 -> NCHW float32 affine on the device
                x = x.permute(0, 3, 1, 2).float() * self.scale + self.offset
            x = x.to(self.dtype)
            logits = self.forward(pixel_values=x).logits.float()
            probs = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
            scores, ids = torch.topk(probs, self.top_k, dim=-1)
            return ids.cpu().numpy(), scores.cpu().numpy()

    def fastest_batch_size(self, input_size: tuple[int, int], candidates=(32, 64, 128, 256, 512, 1024)) -> int:
        """The largest batch that fits in device memory and still raises throughput.

        Doubles the batch while images/s grows by more than 5%; stops at the first
        out-of-memory error. Meant for GPUs, where the best batch depends on the model,
        the dtype and the card.
        """
        import torch

        def synchronize():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        best, best_rate = candidates[0], 0.0
        for size in candidates:
            pixels = np.zeros((size, *input_size, 3), dtype=np.uint8)
            try:
                self.predict_pixels(pixels)  # warm-up: kernels, allocator
                synchronize()
                started = time.perf_counter()
                for _ in range(3):
                    self.predict_pixels(pixels)
                synchronize()
                rate = 3 * size / (time.perf_counter() - started)
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                del pixels
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            if rate < best_rate * 1.05:
                break
            best, best_rate = size, rate
        return best

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table) -> pa.Table:
        started = time.perf_counter()
        if isinstance(batch, pa.Table):  # the pipeline's blocks: images in a binary column
            table = batch.drop_columns(["pixels"])
            ok = pc.is_null(table.column("error")).to_numpy(zero_copy_only=False)
            pixels = _packed_images(batch.column("pixels"), self.pixel_layout) if ok.any() else None
        else:  # numpy batches (anyone's map_batches): pixels (N, H, W, 3), "" or None for no error
            table = _passthrough_table({name: values for name, values in batch.items() if name != "pixels"})
            ok = np.array([not e for e in batch["error"]], dtype=bool)
            pixels = batch["pixels"][ok] if ok.any() else None
        n, k = table.num_rows, self.top_k
        ids = np.zeros((n, k), dtype=np.int64)
        scores = np.zeros((n, k), dtype=np.float32)
        if pixels is not None:
            rows = np.flatnonzero(ok)
            step = self.batch_size or len(rows)
            try:
                for start in range(0, len(rows), step):
                    ids[rows[start:start + step]], scores[rows[start:start + step]] = \
                        self.predict_pixels(pixels[start:start + step])
            except Exception as err:
                if _is_out_of_memory(err):
                    raise  # not the images' fault: let the task be retried
                # The model itself failed on these images: errors are rows, and the
                # driver stops a job whose model fails on everything.
                message = f"model_error: {type(err).__name__}: {_first_line(err)}"
                errors = pc.if_else(pa.array(ok), message, table.column("error"))
                table = table.set_column(table.schema.get_field_index("error"), "error", errors)
                table = table.append_column(MODEL_TRACEBACK, pa.array([traceback.format_exc()] * n, pa.string()))
                ok[:] = False
        mask = pa.array(~ok)
        top_labels = self.labels[ids]
        offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        label = pa.array(top_labels[:, 0].tolist(), pa.string(), mask=~ok)
        table = table.append_column(PREDICTION_FIELDS[0], label)
        table = table.append_column(PREDICTION_FIELDS[1], pa.array(ids[:, 0], pa.int64(), mask=~ok))
        table = table.append_column(PREDICTION_FIELDS[2], pa.array(scores[:, 0], pa.float32(), mask=~ok))
        table = table.append_column(
            PREDICTION_FIELDS[3],
            pa.ListArray.from_arrays(offsets, pa.array(top_labels.ravel().tolist(), pa.string()), mask=mask),
        )
        table = table.append_column(
            PREDICTION_FIELDS[4],
            pa.ListArray.from_arrays(offsets, pa.array(scores.ravel(), pa.float32()), mask=mask),
        )
        if "true_label" in table.column_names:  # null where the truth or the prediction is unknown
            table = table.append_column("correct", pc.equal(table.column("true_label"), label))
        return table.append_column("predict_seconds", pa.array(np.full(n, (time.perf_counter() - started) / max(n, 1))))


def _packed_images(column: pa.ChunkedArray, layout: tuple[tuple[int, ...], str]) -> np.ndarray:
    """The images of a binary column whose values are whole images or empty (a failed
    row), as one array (rows with an image only), without copying their bytes."""
    shape, dtype = layout
    array = column.combine_chunks()
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset:array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return data.view(dtype).reshape(-1, *shape)


def _is_out_of_memory(err: Exception) -> bool:
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def _passthrough_table(columns: dict[str, np.ndarray]) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        if values.dtype == object or values.dtype.kind == "U":
            arrays[name] = pa.array([v or None for v in values.tolist()], pa.string())
        elif name in ("width", "height"):  # -1 marks "unknown" inside the pipeline
            arrays[name] = pa.array(values, pa.int32(), mask=values < 0)
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)

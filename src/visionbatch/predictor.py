"""The model stage: run a Hugging Face image classifier (or zero-shot model) on batches.

:class:`Predictor` is the model stage. It is a plain callable over numpy batches
(usable in anyone's ``map_batches``): it loads the model once, takes uint8 pixels at
the model's input size, applies the rescale/normalise affine on its device, runs the
forward pass under ``torch.inference_mode`` in the chosen dtype, and returns top-k
labels and scores as small arrays, and optionally each image's embedding.

Two kinds of model: an ``AutoModelForImageClassification`` (its own classes; the
embedding is the vector its classification head receives), or, given candidate
labels, an ``AutoModelForZeroShotImageClassification`` such as CLIP or SigLIP (the
labels' text embeddings are computed once, at load; the embedding is the image's
``image_embeds`` before normalisation).
"""

from __future__ import annotations

import time
import traceback

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visionbatch.certificate import Outputs
from visionbatch.config import DEFAULT_HYPOTHESIS_TEMPLATE
from visionbatch.cpu_tuning import keep_freed_memory, pack_linear_layers
from visionbatch.errors import ModelLoadError
from visionbatch.model_loading import (ModelSource, features_of, first_line, image_tower, load_model,
                                       load_tokenizer, model_revision, resolve_device, resolve_dtype,
                                       resolve_model_source)
from visionbatch.results import EMBEDDING, MODEL_TRACEBACK, PREDICTION_FIELDS, RESULT_SCHEMA, TRUE_LABEL_SCORE
from visionbatch.runtime import REDUCED_DTYPES, REFERENCE, ModelPaths, TowerSpec, candidate_paths

# How often a CPU Predictor hands its heap's free pages back (see keep_freed_memory).
_TRIM_EVERY_S = 10.0


class Predictor:
    """The model stage: batches of preprocessed images in, top-k predictions out.

    A batch is a dict of numpy arrays (``pixels`` (N, H, W, 3) uint8 and ``error``, ""
    or None where the image decoded), or a pipeline block: a pyarrow Table whose
    ``pixels`` binary column holds each image's bytes in ``pixel_layout`` (empty for a
    failed row). Every other column passes through ("" in numpy string columns becomes
    null). The forward pass runs ``batch_size`` images at a time; rows with an error get
    null predictions. Output: a pyarrow Table with the passed-through columns plus
    label, label_id, score, top_k_labels, top_k_scores, ``predict_seconds`` (this call's
    time, shared per row), where a ``true_label`` column exists ``correct`` and
    ``true_label_score`` (from the full output, on the device), and with
    ``embedding_width`` an ``embedding`` column of that width (checked; unit length with
    ``normalize_embeddings``). If the model itself fails on a batch, its rows get
    ``model_error`` rows instead.

    On CPU in float32, given ``pixel_layout`` (not under ``compile``), it packs its
    linear layers (:func:`pack_linear_layers`) and cannot be pickled afterwards: build it
    where it runs (Ray's ``map_batches`` takes the class and its arguments).

    With ``candidate_labels`` the model is a zero-shot one and those are its classes:
    scores are the softmax over ``logits_per_image`` (sigmoid for SigLIP), as
    transformers' zero-shot pipeline gives them for ``hypothesis_template``.
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
        fewer_threads: tuple[int, float] | None = None,
        compile: bool = False,
        batch_size: int | None = None,
        pixel_layout: tuple[tuple[int, ...], str] | None = None,
        embedding_width: int | None = None,
        normalize_embeddings: bool = False,
        candidate_labels: tuple[str, ...] | None = None,
        hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE,
        runtime: str = "torch",
        certified_path: str | None = None,
        defer_candidates: bool = False,
        passes_at_once: int = 1,
    ):
        import torch

        source = model if isinstance(model, ModelSource) else resolve_model_source(model)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(resolve_device(device))
        # The faster paths this replica may take once certified (none under --compile).
        # (A Predictor given no pixel layout, in anyone's map_batches, has no probe to convert with.)
        candidates, notes = (([], []) if compile or not pixel_layout
                             else candidate_paths(runtime, dtype, self.device.type))
        if certified_path is not None:  # a resumed job keeps the path its first run certified
            candidates = [certified_path] if certified_path != REFERENCE else []
        # With candidates the model loads as the reference, float32; else as asked.
        self.dtype = torch.float32 if candidates else resolve_dtype(dtype, self.device.type)
        self._trim_heap = keep_freed_memory() if self.device.type == "cpu" else None
        self._trimmed_at = time.monotonic()
        self.zero_shot = candidate_labels is not None
        self.model = load_model(source, dtype=self.dtype, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, zero_shot=self.zero_shot).to(self.device)
        config = self.model.config
        if self.zero_shot:
            self.labels = np.array(candidate_labels, dtype=object)
            # The zero-shot pipeline's rule: sigmoid for SigLIP, softmax otherwise.
            self.sigmoid = "siglip" in config.model_type
            self._prepare_zero_shot(load_tokenizer(source, trust_remote_code), hypothesis_template)
        else:
            self.labels = np.array([config.id2label.get(i, str(i)) for i in range(config.num_labels)], dtype=object)
            # The reference pipeline's rule: sigmoid for multi-label or single-logit heads.
            self.sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1
        self.top_k = min(top_k, len(self.labels))
        # A true label arrives as a class name, and names can repeat (ImageNet's two
        # "crane"s): a name's score is that of its classes together. Made once: the
        # distinct names (looked up per batch) and each class's name, on the device.
        names, name_of_class = np.unique(self.labels.astype(str), return_inverse=True)
        self.names = pa.array(names, pa.string())
        self.name_of_class = torch.from_numpy(name_of_class.reshape(-1)).to(self.device)
        self.embedding_width, self.normalize_embeddings = embedding_width, normalize_embeddings
        self.scale = torch.tensor(scale, dtype=torch.float32, device=self.device)  # per channel, NHWC's last axis
        self.offset = torch.tensor(offset, dtype=torch.float32, device=self.device)
        # What runs per batch: the classifier (and its head's input, for the embedding), or
        # a zero-shot model's image tower, as one module (what other runtimes convert).
        self.tower = image_tower(self.model, zero_shot=self.zero_shot, embeddings=bool(embedding_width))
        self.forward = torch.compile(self.tower) if compile else self.tower
        self.batch_size = batch_size
        self.pixel_layout = pixel_layout  # (shape, dtype) of one image in a pipeline block
        # The faster paths and the certificate that picks one; the reference until then.
        self.paths = ModelPaths(
            candidates, reference=self.forward, notes=notes,
            spec=self._tower_spec(source, {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code})
            if candidates else None,
            fresh_tower=lambda dtype: image_tower(
                load_model(source, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                           zero_shot=self.zero_shot).to(self.device),
                zero_shot=self.zero_shot, embeddings=bool(embedding_width)),
            streams=passes_at_once, certify=certified_path is None, insist=dtype in REDUCED_DTYPES,
            must_pay=runtime == "auto" and dtype == "auto")
        self.packed_layers = 0
        if self.device.type == "cpu" and self.dtype == torch.float32 and pixel_layout and not compile:
            shape, layout_dtype = pixel_layout
            rng, layout_dtype = np.random.default_rng(0), np.dtype(layout_dtype)
            # One image: the probe runs twice before the first result (packing took 1.4 s for
            # ViT-B/16 on one thread, 0.16 s for ViT-Ti).
            probe = (rng.integers(0, 256, (1, *shape)) if layout_dtype == np.uint8 else  # else the processor's output
                     rng.standard_normal((1, *shape))).astype(layout_dtype)
            self.packed_layers = pack_linear_layers(self.model, lambda: self.forward(self._model_input(probe)))
        if fewer_threads and pixel_layout and self.device.type == "cpu":
            self.fit_threads(*fewer_threads)
        if not defer_candidates:
            self.paths.start()

    def _tower_spec(self, source: ModelSource, load_options: dict) -> TowerSpec:
        """What a conversion process needs to build this model's tower, and the cache key's names."""
        shape, layout_dtype = self.pixel_layout
        input_shape = (shape[2], shape[0], shape[1]) if np.dtype(layout_dtype) == np.uint8 else tuple(shape)
        kind = "zero-shot image tower" if self.zero_shot else "classifier"
        return TowerSpec(source.ref, source.local_files_only, input_shape=tuple(input_shape),
                         zero_shot=self.zero_shot, embeddings=bool(self.embedding_width),
                         weights=f"{source.ref}@{model_revision(source)}",
                         description=f"{kind}, embeddings {bool(self.embedding_width)}", **load_options)

    def fit_threads(self, threads: int, images_per_s: float, passes: int = 5) -> float:
        """Keep to ``threads`` torch threads if the model runs at least ``images_per_s``
        on them (it then keeps up with decoding without taking the decoders' cores),
        else keep the threads it has. Returns the images/s measured.

        Timed on a batch of zeros, once per replica, while the rest of the job starts
        too: the best of up to ``passes`` passes (the first is slower: it allocates),
        ending early where one pass reaches the bar or misses it by more than 4x.
        ~0.5 s for ViT-Ti, ~2 s for ViT-B/16 on one thread."""
        import torch

        more = torch.get_num_threads()
        torch.set_num_threads(threads)
        shape, dtype = self.pixel_layout
        probe = np.zeros((self.batch_size or 16, *shape), dtype=np.dtype(dtype))
        rate = 0.0
        for _ in range(passes):
            started = time.perf_counter()
            try:
                self.predict_pixels(probe)
            except Exception:  # a model that fails on images fails on the job's own, as such: no choice here
                rate = 0.0
                break
            rate = max(rate, len(probe) / (time.perf_counter() - started))
            if not images_per_s / 4 < rate < images_per_s:
                break
        if rate < images_per_s:
            torch.set_num_threads(more)
        return rate

    def _prepare_zero_shot(self, tokenizer, template: str) -> None:
        """The candidate labels' text embeddings, once; then a check, on a random image,
        that scoring images against them gives the model's own ``logits_per_image``."""
        import torch

        model = self.model
        kwargs = {"padding": True}  # the zero-shot pipeline's tokenizer arguments
        if "siglip" in model.config.model_type:
            kwargs.update(padding="max_length", max_length=64, truncation=True)
        text = tokenizer([template.format(label) for label in self.labels], return_tensors="pt", **kwargs)
        text = text.to(self.device)
        if not (hasattr(model, "logit_scale") or hasattr(model, "temperature")):
            raise ModelLoadError(f"zero-shot scoring of {type(model).__name__} is not supported")
        with torch.inference_mode():
            # Families differ only in how similarity becomes a logit: exp(logit_scale)
            # (CLIP), plus logit_bias (SigLIP), or 1 / temperature (ALIGN).
            scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else 1 / model.temperature
            self.logit_scale = scale.float()
            self.logit_bias = model.logit_bias.float() if hasattr(model, "logit_bias") else 0.0
            text_embeds = features_of(model.get_text_features(**text)).float()
            self.text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
            size = model.config.vision_config.image_size
            probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            probe = probe.to(self.device, self.dtype)
            expected = model(pixel_values=probe, **text).logits_per_image.float()
            got = self._zero_shot_logits(features_of(model.get_image_features(pixel_values=probe)))
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not torch.allclose(got, expected, rtol=tolerance, atol=tolerance * (1 + expected.abs().max().item())):
            raise ModelLoadError(f"zero-shot scoring of {type(model).__name__} does not reproduce its "
                                 f"logits_per_image (largest difference {(got - expected).abs().max().item():.3g})")

    def _zero_shot_logits(self, image_embeds):
        image_embeds = image_embeds.float()
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        return image_embeds @ self.text_embeds.T * self.logit_scale + self.logit_bias

    def _probs_and_embeddings(self, outputs: tuple):
        """A tower's outputs -> every class's score (float32) and, where asked, the
        images' embeddings (float32, normalised where asked), on the device."""
        import torch

        if self.zero_shot:
            logits, embeddings = self._zero_shot_logits(outputs[0]), outputs[0] if self.embedding_width else None
        else:
            logits, embeddings = outputs[0], outputs[1] if len(outputs) > 1 else None
        logits = logits.float()
        probs = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        if embeddings is not None:
            if embeddings.shape[1] != self.embedding_width:
                raise ValueError(f"the embedding is {embeddings.shape[1]} wide where the model's config gives "
                                 f"{self.embedding_width}")
            embeddings = embeddings.float()
            if self.normalize_embeddings:
                embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        return probs, embeddings

    def _on_host(self, outputs: tuple) -> Outputs:
        """A tower's outputs as the certificate compares them."""
        probs, embeddings = self._probs_and_embeddings(outputs)
        return Outputs(probs.cpu().numpy(), None if embeddings is None else embeddings.cpu().numpy())

    def _model_input(self, pixels: np.ndarray):
        """(N, H, W, 3) uint8 or (N, C, H, W) float32 -> the model's input on its device."""
        import torch

        host = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cuda":
            host = host.pin_memory()
        x = host.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            # uint8 NHWC -> float32, the affine in place, then NCHW: one new float
            # tensor where `permute().float() * scale + offset` made three (each a
            # fresh mmap and its page faults on CPU; figures: benchmarks/RESULTS.md,
            # "CPU tuning (cpu_tuning.py): the measurements").
            x = x.float().mul_(self.scale).add_(self.offset).permute(0, 3, 1, 2).contiguous()
        return x.to(self.dtype)

    def predict_pixels(self, pixels: np.ndarray, true_names: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(N, H, W, 3) uint8, or (N, C, H, W) float32 already preprocessed (the slow
        path) -> (top-k class ids, top-k scores), each (N, k), the embeddings
        (N, embedding_width) float32, or None where not asked for, and with
        ``true_names`` (N,) (indices into ``self.names``, -1 where unknown) each image's
        score of its true name (N,) float32 (meaningless where unknown), else None."""
        import torch

        with torch.inference_mode():
            pixel_values = self._model_input(pixels)
            forward = self.paths.forward_now()
            outputs = forward(pixel_values) if forward else self.paths.certify(pixel_values, self._on_host)
            probs, embeddings = self._probs_and_embeddings(outputs)
            scores, ids = torch.topk(probs, self.top_k, dim=-1)
            true_scores = None
            if true_names is not None:  # from the full output: the true name need not be in the top-k
                by_name = probs.new_zeros(len(probs), len(self.names)).index_add_(1, self.name_of_class, probs)
                rows = torch.from_numpy(np.maximum(true_names, 0)).to(self.device)
                true_scores = by_name.gather(1, rows[:, None])[:, 0].cpu().numpy()
            if embeddings is not None:
                embeddings = embeddings.cpu().numpy()
            return ids.cpu().numpy(), scores.cpu().numpy(), embeddings, true_scores

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
        embeddings = np.zeros((n, self.embedding_width or 0), dtype=np.float32)
        labelled = "true_label" in table.column_names
        true_names = (pc.fill_null(pc.index_in(table.column("true_label"), value_set=self.names), -1)
                      .to_numpy() if labelled else None)
        true_scores = np.zeros(n, dtype=np.float32)
        if pixels is not None:
            rows = np.flatnonzero(ok)
            step = self.batch_size or len(rows)
            try:
                for start in range(0, len(rows), step):
                    batch_rows = rows[start:start + step]
                    ids[batch_rows], scores[batch_rows], batch_embeddings, batch_true_scores = self.predict_pixels(
                        pixels[start:start + step], None if true_names is None else true_names[batch_rows])
                    if batch_embeddings is not None:
                        embeddings[batch_rows] = batch_embeddings
                    if batch_true_scores is not None:
                        true_scores[batch_rows] = batch_true_scores
            except Exception as err:
                if _is_out_of_memory(err):
                    raise  # not the images' fault: let the task be retried
                # The model itself failed on these images: errors are rows, and the
                # driver stops a job whose model fails on everything.
                message = f"model_error: {type(err).__name__}: {first_line(err)}"
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
        if labelled:  # null where the truth or the prediction is unknown
            table = table.append_column("correct", pc.equal(table.column("true_label"), label))
            table = table.append_column(RESULT_SCHEMA.field(TRUE_LABEL_SCORE),
                                        pa.array(true_scores, pa.float32(), mask=~ok | (true_names < 0)))
        if self.embedding_width:
            table = table.append_column(EMBEDDING, pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.ravel(), pa.float32()), self.embedding_width, mask=mask))
        table = table.append_column("predict_seconds", pa.array(np.full(n, (time.perf_counter() - started) / max(n, 1))))
        if self._trim_heap and time.monotonic() - self._trimmed_at > _TRIM_EVERY_S:
            self._trim_heap(0)
            self._trimmed_at = time.monotonic()
        return table


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

"""Model references and safe loading: where a model comes from (a local folder, the
hub, or the cache, decided in seconds), which weights it names, and its processor,
config, tokenizer and model loaded without running its code (safetensors only, no
remote code unless asked); checkpoints that lack classifier weights are refused. Also
what the model stage computes of it: the classification head, its input (the
embedding) and the image tower every runtime runs.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass

from visionbatch.errors import ModelLoadError


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

    return _from_pretrained(AutoImageProcessor, "image processor", source, trust_remote_code)


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, "config", source, trust_remote_code)


def _from_pretrained(auto_class, what: str, source: ModelSource, trust_remote_code: bool, why: str = ""):
    """``auto_class.from_pretrained`` for ``source``; a failure is a ModelLoadError naming
    ``what`` (and ``why`` it is needed)."""
    try:
        return auto_class.from_pretrained(source.ref, local_files_only=source.local_files_only,
                                          trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelLoadError(f"cannot load the {what} of {source.ref}{why}: {first_line(err)}"
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


def _auto_model_class(zero_shot: bool):
    from transformers import AutoModelForImageClassification, AutoModelForZeroShotImageClassification

    return AutoModelForZeroShotImageClassification if zero_shot else AutoModelForImageClassification


def load_model(source: ModelSource, *, dtype, allow_pickle: bool = False, trust_remote_code: bool = False,
               zero_shot: bool = False):
    """AutoModelForImageClassification (``zero_shot``: AutoModelForZeroShotImageClassification)
    with safetensors only (unless allowed) and SDPA where supported."""
    auto_class = _auto_model_class(zero_shot)
    kwargs = dict(
        local_files_only=source.local_files_only,
        trust_remote_code=trust_remote_code,
        # Pickled .bin weights can run code on load: refuse them unless asked.
        use_safetensors=None if allow_pickle else True,
        dtype=dtype,
        output_loading_info=True,  # which weights the checkpoint lacked: check_weights_complete
    )
    try:
        try:
            model, loading = auto_class.from_pretrained(source.ref, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError) as err:
            if "sdpa" not in str(err).lower() and "attn" not in str(err).lower():
                raise
            model, loading = auto_class.from_pretrained(source.ref, **kwargs)
    except Exception as err:
        hint = ""
        if not allow_pickle and ("safetensors" in str(err).lower() or "model.safetensors" in str(err)):
            hint = " (only safetensors weights are loaded; pass --allow-pickle to load .bin weights you trust)"
        raise ModelLoadError(f"cannot load model {source.ref}: {first_line(err)}{hint}") from None
    check_weights_complete(source.ref, model.config, sorted(loading["missing_keys"]), zero_shot)
    return model.eval()


def check_weights_complete(ref: str, config, missing: list[str], zero_shot: bool) -> None:
    """Refuse a model some of whose weights are not in its checkpoint: transformers would
    start them at random (a CLIP or backbone checkpoint loaded as a classifier gets a
    random head) and every label would be noise."""
    if not missing:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES

    hint = ""
    if not zero_shot and config.model_type in MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        hint = "; it is a zero-shot model: give the labels to choose from with --candidate-labels"
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    raise ModelLoadError(f"model {ref} lacks weights its {'zero-shot ' if zero_shot else ''}classifier needs "
                         f"({shown}): they would be random, and so would its labels{hint}")


def check_model_kind(config, zero_shot: bool) -> None:
    """Zero-shot labels need a zero-shot model: say so before any worker loads it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if zero_shot and config.model_type not in MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES \
            and not getattr(config, "auto_map", None):
        raise ModelLoadError(f"--candidate-labels needs a zero-shot image classification model (CLIP, SigLIP, ...); "
                             f"this one is a {config.model_type}")


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, "tokenizer", source, trust_remote_code, " (zero-shot labels need one)")


def classification_head(model):
    """The module that turns an image's vector into class logits (``classifier``,
    ``head`` or ``fc``, as transformers names them); refused where there is no single one."""
    import torch

    for name in ("classifier", "head", "fc"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            if isinstance(head, torch.nn.Identity):
                raise ModelLoadError(f"--embeddings: {type(model).__name__} has no classification head "
                                     "(num_labels=0)")
            return head
    raise ModelLoadError(f"--embeddings: {type(model).__name__} has no single classification head (no module named "
                         "classifier, head or fc); models whose logits come from several heads, such as DeiT's "
                         "distilled ...WithTeacher, are not supported")


class HeadInput:
    """Records what a classifier's head receives in a forward pass (a forward pre-hook):
    the image's vector, flattened to (N, width). Per thread: passes may run in several
    at once (the local engine's lanes), and a hook runs in its pass's thread."""

    def __init__(self, model):
        self._recorded = threading.local()
        classification_head(model).register_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        self._recorded.value = args[0].flatten(1)

    def take(self):
        value, self._recorded.value = getattr(self._recorded, "value", None), None
        return value


def features_of(output):
    """get_image_features / get_text_features: a tensor (transformers 4), or an output
    whose pooler_output is the projected vector (transformers 5)."""
    return output if hasattr(output, "shape") else output.pooler_output


def image_tower(model, *, zero_shot: bool, embeddings: bool):
    """The torch module every runtime computes: pixel_values -> (logits,) or (logits,
    head input) for a classifier, (image embeddings,) for a zero-shot model."""
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.head_input = HeadInput(model) if embeddings and not zero_shot else None

        def forward(self, pixel_values):
            if zero_shot:
                return (features_of(self.model.get_image_features(pixel_values=pixel_values)),)
            logits = self.model(pixel_values=pixel_values).logits
            return (logits, self.head_input.take()) if self.head_input else (logits,)

    return ImageTower().eval()


def embedding_width(config, image_size: tuple[int, int], *, zero_shot: bool, trust_remote_code: bool = False) -> int:
    """The width of the model's embedding, from its config alone: the model built on the
    meta device (no weights, no memory) runs one forward pass of shapes only."""
    import torch

    with torch.device("meta"):
        model = _auto_model_class(zero_shot).from_config(config, trust_remote_code=trust_remote_code)
    pixels = torch.empty(1, 3, *image_size, device="meta")
    with torch.inference_mode():
        if zero_shot:
            return features_of(model.get_image_features(pixel_values=pixels)).shape[1]
        head_input = HeadInput(model)
        model(pixel_values=pixels)
        return head_input.take().shape[1]


def _remote_code_hint(err: Exception) -> str:
    """transformers names its own argument on a second line that first_line drops."""
    if "trust_remote_code" in str(err) or "contains custom code" in str(err):
        return " (pass --trust-remote-code to run the model's own code; only for models you trust)"
    return ""


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:400]

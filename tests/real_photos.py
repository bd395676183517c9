"""Real photographs for tests, from scikit-image's bundled samples (no download), and ImageNet-normalised
batches of them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Colour and grey photographs that ship inside the scikit-image wheel (others need pooch and a download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "camera", "coins")
# More of them, for catalogues: textures that look alike (brick, grass, gravel), the moon, a clock, a colour wheel.
EXTRA_PHOTOS = ("moon", "brick", "grass", "gravel", "clock", "colorwheel")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def photos(longest: int = 320, extra: bool = False) -> list[Image.Image]:
    """The photos as RGB, longest side at most ``longest`` px (small files, fast decoding); ``extra``: with
    EXTRA_PHOTOS."""
    import skimage.data

    out = []
    for name in PHOTOS + (EXTRA_PHOTOS if extra else ()):
        data = getattr(skimage.data, name)()
        if isinstance(data, tuple):  # stereo pairs: the left view
            data = data[0]
        img = Image.fromarray(data).convert("RGB")
        img.thumbnail((longest, longest))
        out.append(img)
    return out


def imagenet_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    """Squashed to ``size``x``size`` (bicubic), ImageNet mean/std: ``[B, 3, size, size]`` float32."""
    arrays = [(np.asarray(img.resize((size, size), Image.BICUBIC)) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
              for img in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32))

"""Pooling: what one forward pass keeps of the tokens, and the strategies read from it (DINO's eval scripts).

A pass keeps, per image, three *components*, un-normalised and summed over scales when multi-scale:

- ``cls``: the CLS token of each of the last :data:`~bannermatch.recipe.STORED_BLOCKS` blocks ``[B, 4, D]``;
- ``mean``: the mean final patch token, through the backbone's pooling norm ``[B, D]``;
- ``gem``: the generalised mean (p = 4) of the final patch tokens ``[B, D]``.

Every strategy is a view of these, chosen when the features are read:

- ``simple``: the final CLS (DINO's k-NN evaluation);
- ``complex``: the CLS of the last n blocks, optionally with the mean patch token (DINO's linear evaluation);
- ``gem``: the final CLS and the GeM patch token, each L2-normalised before they are concatenated so neither
  half outweighs the other (DINO's copy detection also learns a whitening on a training set; we have none);
- ``mean``: the mean patch token (BEiT's own pooling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .recipe import STORED_BLOCKS, Recipe

COMPONENTS = ("cls", "mean", "gem")
GEM_P = 4.0


def pool_components(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], pool_norm) -> dict[str, torch.Tensor]:
    """The stored components of one batch, in float32, from the ``(cls, patches)`` of the last blocks."""
    patches = layers[-1][1].float()
    return {
        "cls": torch.stack([cls.float() for cls, _ in layers[-STORED_BLOCKS:]], dim=1),
        "mean": pool_norm(patches.mean(dim=1)).float(),
        "gem": patches.clamp(min=1e-6).pow(GEM_P).mean(dim=1).pow(1 / GEM_P),
    }


def needed_components(recipe: Recipe) -> tuple[str, ...]:
    """The components a strategy reads."""
    return {"simple": ("cls",), "mean": ("mean",), "gem": ("cls", "gem"),
            "complex": ("cls", "mean") if recipe.avgpool else ("cls",)}[recipe.strategy]


def view(components: Mapping[str, np.ndarray | torch.Tensor], recipe: Recipe) -> torch.Tensor:
    """L2-normalised features ``[N, F]`` (float32) of a strategy, from stored components."""
    c = {name: torch.as_tensor(components[name]).float() for name in needed_components(recipe)}
    if recipe.strategy == "simple":
        out = c["cls"][:, -1]
    elif recipe.strategy == "mean":
        out = c["mean"]
    elif recipe.strategy == "gem":
        out = torch.cat((F.normalize(c["cls"][:, -1], dim=-1), F.normalize(c["gem"], dim=-1)), dim=-1)
    else:
        out = c["cls"][:, -recipe.n_last_blocks:].flatten(1)
        if recipe.avgpool:
            out = torch.cat((out, c["mean"]), dim=-1)
    return F.normalize(out, dim=-1)

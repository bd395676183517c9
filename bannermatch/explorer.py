"""Interactive explorer (standard ipywidgets, no custom front-end code): pick a feature set, type a game, see its matches.

Works in JupyterLab, Jupyter Notebook and Colab, with ipywidgets 7.7 (Colab's) or 8: it uses only widgets and
traits both have (Combobox came in 7.5). Typing suggests game names of the chosen feature set; the grid
re-renders in place when the game, the feature set or k changes.
"""

from __future__ import annotations

import html
import re
from collections import OrderedDict
from pathlib import Path

import ipywidgets as widgets

from .defaults import DEFAULT_STORE
from .errors import BannermatchError
from .extraction import load_backbone
from .store import DEFAULT_STORE, FeatureSet, list_feature_sets
from .gallery import GRID_STYLE, banner_figure, match_grid, store_page, thumbnail_data_uri
from .query import QueryResult, query
from .steam import normalize_name

#: How suggestions are written in the combobox: "Name (appid)", so picking one names exactly one game.
_SUGGESTION = re.compile(r"^(?P<name>.*) \((?P<key>[^()]+)\)$")
MAX_SUGGESTIONS = 12
MAX_K = 50
#: Thumbnails kept between refreshes (about 15 kB each as data URIs), so the banners on show are read once.
MAX_THUMBNAILS = 1000


def _suggestion(key: str, name: str) -> str:
    return f"{name} ({key})"


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # names too long for a path, NUL characters
        return False


class Explorer(widgets.VBox):
    """The explorer widget. Its parts are attributes, so code (and tests) can drive it:

    ``feature_set`` (Dropdown of stored sets), ``query`` (Combobox: game name, app id, image path or URL),
    ``k`` (IntSlider), ``status`` and ``grid`` (HTML); ``result`` is the QueryResult on show.
    """

    def __init__(self, feature_sets: list[FeatureSet], weights: str | Path | None = None, k: int = 10,
                 device: str | None = None):
        if not feature_sets:
            raise BannermatchError("no feature sets to explore")
        self.feature_sets = feature_sets
        self.weights, self.device = weights, device
        self.result: QueryResult | None = None
        self._backbone: tuple[tuple, object] | None = None  # (what it was built from, the model)
        self._thumbnails: OrderedDict[tuple[str, str], str | None] = OrderedDict()
        labels = [f"{fs.recipe.label} ({fs.size})" for fs in feature_sets]
        labels = [lab if labels.count(lab) == 1 else f"{lab} {fs.path.name}" for lab, fs in zip(labels, feature_sets)]
        self.feature_set = widgets.Dropdown(options=list(zip(labels, range(len(feature_sets)))), description="features",
                                            layout=widgets.Layout(width="auto"))
        self.query = widgets.Combobox(placeholder="game name or app id", description="game", ensure_option=False,
                                      layout=widgets.Layout(width="32em"))
        max_k = max(1, min(MAX_K, min(len(fs.keys) for fs in feature_sets) - 1))
        self.k = widgets.IntSlider(value=min(k, max_k), min=1, max=max_k, description="k")
        self.status = widgets.HTML()
        self.grid = widgets.HTML()
        for widget in (self.feature_set, self.query, self.k):
            widget.observe(self.refresh, names="value")
        super().__init__([widgets.HBox([self.feature_set, self.k]), self.query, self.status, self.grid])
        self.refresh()

    @property
    def features(self) -> FeatureSet:
        return self.feature_sets[self.feature_set.value]

    def backbone(self, fs: FeatureSet):
        """The model that embeds image queries for ``fs``, loaded once and kept while the sets shown share it."""
        recipe = fs.recipe
        built_from = (recipe.model, recipe.source, recipe.weights, recipe.arch, recipe.input_size(), self.device)
        if self._backbone is None or self._backbone[0] != built_from:
            self._backbone = None  # let the previous model go before the next one loads
            self._backbone = (built_from, load_backbone(recipe, self.weights, self.device, "auto"))
        return self._backbone[1]

    def _target(self, text: str) -> str | None:
        """What the text names exactly: a stored key, an image path/URL, or None while it is still ambiguous."""
        fs = self.features
        picked = _SUGGESTION.match(text)
        if picked and picked["key"] in fs.index_map():
            return picked["key"]
        if text in fs.index_map() or text.startswith(("http://", "https://")) or _is_file(text):
            return text
        exact = [key for key, name in self.features.name_index().search(text, MAX_SUGGESTIONS)
                 if normalize_name(name) == normalize_name(text)]
        return exact[0] if exact else None

    def refresh(self, change=None) -> None:
        """Update the suggestions, then the grid if the text names one game (called on every change)."""
        fs = self.features
        text = self.query.value.strip()
        hits = self.features.name_index().search(_SUGGESTION.sub(r"\g<name>", text), MAX_SUGGESTIONS) if text else []
        self.query.options = tuple(_suggestion(key, name) for key, name in hits)
        target = self._target(text) if text else None
        if target is None:
            self.status.value = (f"{len(hits)} games match; pick one" if hits else
                                 "no game of this feature set matches" if text else "type a game name or an app id")
            return
        try:
            backbone = None if target in fs.index_map() else self.backbone(fs)  # only image queries need a model
            self.result = query(fs, target, k=self.k.value, weights=self.weights, device=self.device,
                                backbone=backbone)[0]
        except BannermatchError as exc:
            self.status.value = f"<b>{html.escape(str(exc))}</b>"
            return
        self.status.value = html.escape(f"top-{self.k.value} of {len(fs.keys)} banners under {fs.recipe.label}")
        self.grid.value = self._render(self.result)

    def _thumbnails_of(self, keys: list[str]) -> dict[str, str | None]:
        """Thumbnails of stored banners; only those not shown before are read from the collection (an archive
        is read in one pass for all of them, not once per refresh)."""
        from .display import banner_images

        fs = self.features
        missing = [key for key in keys if (fs.images, key) not in self._thumbnails]
        if missing:
            for key, image in banner_images(fs, missing).items():
                self._thumbnails[fs.images, key] = thumbnail_data_uri(image) if image is not None else None
        out = {}
        for key in keys:
            self._thumbnails.move_to_end((fs.images, key))
            out[key] = self._thumbnails[fs.images, key]
        while len(self._thumbnails) > max(MAX_THUMBNAILS, len(keys)):
            self._thumbnails.popitem(last=False)
        return out

    def _render(self, result: QueryResult) -> str:
        fs = self.features
        thumbnails = self._thumbnails_of(result.keys)

        def figure(key, name, score=None, image=None):
            src = thumbnail_data_uri(image) if image is not None else thumbnails.get(key)
            return banner_figure(src, name, key, score, store_page(key))

        query_fig = figure(result.key, result.name, image=result.image)
        grid = "".join(figure(key, fs.name(key), score) for key, score in result.matches)
        return f"<style>{GRID_STYLE}</style>{match_grid(query_fig, grid)}"


def explore(store: str | Path = DEFAULT_STORE, weights: str | Path | None = None,
            game: str | None = None, k: int = 10, device: str | None = None) -> Explorer:
    """The explorer over every feature set in ``store``; display it (last line of a notebook cell).

    ``game``: a first query to show. ``weights``: the local weights the features were made with, needed only to embed image queries.
    """
    feature_sets = list_feature_sets(store)
    if not feature_sets:
        raise BannermatchError(f"no feature sets in {store}; run `bannermatch embed` (or the notebook) first")
    explorer = Explorer(feature_sets, weights, k, device)
    if game:
        explorer.query.value = game
    return explorer

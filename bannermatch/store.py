"""The feature store: what each forward pass computed, kept per banner content, so only what changed is embedded.

``store/<recipe.slug>/`` holds one forward pass (model, source, weights, preprocessing, multiscale):

- ``seg_00000.npz`` ...: append-only segments of up to ``chunk_size`` banners: ``key``, ``digest`` (sha256 of the
  image bytes, 16 hex digits) and the pooling components ``cls`` ``[n, blocks, D]``, ``mean`` and ``gem``
  ``[n, D]`` (float16). Plain numpy: ``np.load(file, allow_pickle=False)["key"]``.
- ``manifest.json``: the segments with their sha256, the precision each was computed in, the listing identity ->
  digest cache (so unchanged images are not even read again), images that could not be used, and the current
  *collection*: the (key, digest) of every banner of the last run's images, in order, with names.

A row is identified by the digest of its image bytes: a new or changed banner has a new digest and is embedded;
an unchanged one is found; a removed one is no longer in the collection. Writes are atomic and the manifest is
rewritten after each segment, so a killed run loses at most one segment's work; damaged segments are found by
their digest and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from . import __version__
from .defaults import DEFAULT_STORE
from .errors import BannermatchError
from .files import atomic_write, file_digest
from .pooling import COMPONENTS, needed_components, view
from .recipe import Recipe
from .sources import Entry
from .steam import NameIndex

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_MANIFEST_KEYS = {"recipe", "segments", "identities", "failed", "views", "collection"}  # what every writer writes


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def listing_identity(entry: Entry) -> str:
    """What identifies an image's bytes without reading them: its place, its size and its container's
    modification time. When it changes, the bytes are read and hashed again (and embedded only if new)."""
    try:
        container = os.stat(entry.container)
        stamp = f"{container.st_size}:{container.st_mtime_ns}"
    except OSError:
        stamp = "?"
    return "\0".join([os.path.abspath(entry.container), *entry.via, entry.member, str(entry.size), stamp])


@dataclass
class FeatureSet:
    """Features of a collection under one recipe: row i of ``features`` belongs to ``keys[i]``."""

    path: Path
    recipe: Recipe
    keys: list[str]
    features: np.ndarray  # float32, L2-normalised
    names: dict[str, str] = field(default_factory=dict)
    skipped: list[list[str]] = field(default_factory=list)
    images: str = ""  # absolute path of the images the collection was listed from
    digests: list[str] = field(default_factory=list)  # sha256 (16 hex) of each banner's bytes

    @cached_property  # hashed once: every find_matches asks for it
    def content_id(self) -> str:
        """Identifies these exact features: the view, and every banner's key and bytes (keys matches)."""
        h = hashlib.sha256(f"{self.recipe.slug}\0{self.recipe.view}\n".encode())
        for key, digest in zip(self.keys, self.digests):
            h.update(f"{key}\0{digest}\n".encode())
        return h.hexdigest()[:16]

    def index_map(self) -> dict[str, int]:
        if getattr(self, "_index", None) is None or len(self._index) != len(self.keys):
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    def index_of(self, key: str) -> int:
        try:
            return self.index_map()[key]
        except KeyError:
            raise BannermatchError(f"{key!r} is not in this feature set ({len(self.keys)} banners)") from None

    def name(self, key: str) -> str:
        return self.names.get(key, "")

    def name_index(self) -> NameIndex:
        """The names of this set's banners, indexed once for the searches of queries and the explorer."""
        if getattr(self, "_name_index", None) is None:
            index = self.index_map()
            self._name_index = NameIndex({k: v for k, v in self.names.items() if k in index})
        return self._name_index


class FeatureStore:
    """One forward pass's stored components, opened (or created) for a recipe."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._rows: dict[str, tuple[int, int]] | None = None
        self.damaged: list[Path] = []  # segments found changed or damaged (their banners are embedded again)

    @classmethod
    def open(cls, path: str | Path, recipe: Recipe | None = None, create: bool = False) -> FeatureStore:
        path = Path(path)
        if not (path / MANIFEST).exists():
            if not create:
                raise BannermatchError(f"no feature set at {path} (no {MANIFEST}); run `bannermatch embed` first")
            path.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT_VERSION, "library": __version__, "recipe": recipe.pass_dict(),
                        "segments": [], "identities": {}, "failed": {}, "views": [], "collection": None}
            return cls(path, manifest)
        manifest = _read_manifest(path)
        if recipe is not None and manifest["recipe"] != recipe.pass_dict():
            stored = manifest["recipe"]
            diff = ", ".join(f"{k}: stored {v!r}, asked {recipe.pass_dict().get(k)!r}"
                             for k, v in stored.items() if recipe.pass_dict().get(k) != v)
            raise BannermatchError(f"{path} holds features of another recipe ({diff}); choose another --store")
        return cls(path, manifest)

    # ---------------------------------------------------------------------------------- rows

    def rows(self) -> dict[str, tuple[int, int]]:
        """digest -> (segment, row) of every intact stored banner. Damaged segments are left out (recomputed)."""
        if self._rows is None:
            self._rows = {}
            intact = []
            for seg in self.manifest["segments"]:
                file = self.path / seg["file"]
                if not (file.is_file() and file_digest(file) == seg["sha256"]):
                    self.damaged.append(file)
                    continue
                intact.append(seg)
            self.manifest["segments"] = intact
            for s, seg in enumerate(intact):
                for r, digest in enumerate(seg["digests"]):
                    self._rows[digest] = (s, r)
        return self._rows

    def known(self, digest: str) -> bool:
        return digest in self.rows() or digest in self.manifest["failed"]

    def add_segment(self, entries: list[tuple[str, str]], components: dict[str, np.ndarray], run: dict,
                    identities: dict[str, str], failed: dict[str, str]) -> None:
        """Write one segment (``entries``: (key, digest) per row) and record it with what the run learnt."""
        rows = self.rows()
        index = len(self.manifest["segments"])
        file = f"seg_{index:05d}.npz"
        while (self.path / file).exists():  # a segment of a killed run that never reached the manifest
            index += 1
            file = f"seg_{index:05d}.npz"
        arrays = {"key": np.array([k for k, _ in entries], dtype=str),
                  "digest": np.array([d for _, d in entries], dtype=str)}
        for name in COMPONENTS:
            values = components[name]
            if not np.all(np.isfinite(values)) or np.abs(values).max(initial=0) > np.finfo(np.float16).max:
                raise BannermatchError(f"{self.path}: the model produced non-finite or out-of-range features")
            arrays[name] = values.astype(np.float16)
        atomic_write(self.path / file, lambda fh: np.savez(fh, **arrays))
        self.manifest["segments"].append({"file": file, "sha256": file_digest(self.path / file), "rows": len(entries),
                                          "digests": [d for _, d in entries], **run})
        for r, (_, digest) in enumerate(entries):
            rows[digest] = (len(self.manifest["segments"]) - 1, r)
        self.record(identities, failed)

    def record(self, identities: dict[str, str], failed: dict[str, str], collection: dict | None = None) -> None:
        """Save what a run learnt (listing identities, unusable images, the collection) with the manifest."""
        self.manifest["identities"].update(identities)
        self.manifest["failed"].update(failed)
        if collection is not None:
            self.manifest["collection"] = collection
        atomic_write(self.path / MANIFEST, lambda fh: fh.write(json.dumps(self.manifest).encode()))

    def add_view(self, recipe: Recipe) -> None:
        """Remember a strategy that was asked for, so pickers (the explorer) list it."""
        entry = {"strategy": recipe.strategy, "n_last_blocks": recipe.n_last_blocks, "avgpool": recipe.avgpool}
        if entry not in self.manifest["views"]:
            self.manifest["views"].append(entry)
            self.record({}, {})

    # ---------------------------------------------------------------------------------- reading

    def components(self, digests: list[str], names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The stored components of the given banners, in that order."""
        rows = self.rows()
        where = np.array([rows[d] for d in digests], dtype=np.int64).reshape(-1, 2)
        out: dict[str, np.ndarray] = {}
        for s, seg in enumerate(self.manifest["segments"]):
            at = np.nonzero(where[:, 0] == s)[0]
            if not len(at):
                continue
            file = self.path / seg["file"]
            try:
                with np.load(file, allow_pickle=False) as data:
                    for name in names:
                        values = data[name]
                        if name not in out:
                            out[name] = np.empty((len(digests), *values.shape[1:]), np.float32)
                        out[name][at] = values[where[at, 1]]
            except (OSError, ValueError, KeyError) as exc:
                raise BannermatchError(f"{file} is damaged ({exc}); run embed again to recompute it") from None
        return out

    def feature_set(self, recipe: Recipe, collection: dict | None = None) -> FeatureSet:
        """The features of the stored collection (or of ``collection``: a sample) under ``recipe``'s strategy."""
        collection = collection or self.manifest.get("collection")
        if not collection:
            raise BannermatchError(f"{self.path} is incomplete (the last embed did not finish); run embed again to resume")
        keys = [k for k, _ in collection["entries"]]
        digests = [d for _, d in collection["entries"]]
        missing = [k for k, d in collection["entries"] if d not in self.rows()]
        if missing and self.damaged:
            raise BannermatchError(f"{self.damaged[0]} was changed or damaged since it was written; "
                                   "run embed again to recompute it")
        if missing:
            raise BannermatchError(f"{self.path}: {len(missing)} banners' features are missing or damaged "
                                   f"(first: {missing[0]}); run embed again to recompute them")
        blocks = self.manifest["segments"][0].get("blocks", 1) if self.manifest["segments"] else 1
        if recipe.strategy == "complex" and recipe.n_last_blocks > blocks:
            raise BannermatchError(f"n_last_blocks={recipe.n_last_blocks} but {recipe.model} has {blocks} blocks")
        comps = self.components(digests, needed_components(recipe))
        features = view(comps, recipe).numpy() if keys else np.zeros((0, 0), np.float32)
        skipped = collection.get("skipped", [])
        return FeatureSet(self.path, recipe, keys, features, collection.get("names", {}), skipped,
                          collection.get("images", ""), digests)


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise BannermatchError(f"no feature set at {path} (no {MANIFEST}); run `bannermatch embed` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BannermatchError(f"{file} is damaged (not valid JSON); delete {path} and embed again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or not _MANIFEST_KEYS <= manifest.keys():
        raise BannermatchError(f"{file} is not a bannermatch manifest of this format; delete {path} and embed again")
    if manifest.get("library") != __version__:  # features may differ between versions: never mix them
        raise BannermatchError(f"{file} was written by bannermatch {manifest.get('library')}, this is {__version__}; "
                               f"delete {path} (or use another --store) and embed again")
    return manifest


def load_features(path: str | Path, recipe: Recipe | None = None) -> FeatureSet:
    """Open a stored feature set. With ``recipe``, its strategy is read (and a store of another pass refused);
    without, the first strategy that was embedded."""
    store = FeatureStore.open(path, recipe)
    if recipe is None:
        views = store.manifest["views"] or [{"strategy": "simple", "n_last_blocks": 1, "avgpool": False}]
        recipe = Recipe.from_dict({**store.manifest["recipe"], **views[0]})
    return store.feature_set(recipe)


def list_feature_sets(store: str | Path = DEFAULT_STORE) -> list[FeatureSet]:
    """Every complete feature set under ``store``, once for each strategy that was asked for (explorer pickers)."""
    out = []
    for manifest in sorted(Path(store).glob(f"*/{MANIFEST}")):
        try:
            fstore = FeatureStore.open(manifest.parent)
            for v in fstore.manifest["views"] or [{"strategy": "simple", "n_last_blocks": 1, "avgpool": False}]:
                out.append(fstore.feature_set(Recipe.from_dict({**fstore.manifest["recipe"], **v})))
        except BannermatchError as exc:
            log.warning("ignoring %s: %s", manifest.parent, exc)
    return out

"""The feature store: what each forward pass computed, kept per banner content, so only what changed is embedded.

``store/<recipe.slug>/`` holds one forward pass (model, source, weights, preprocessing, multiscale):

- ``seg_<sha256>.npz`` ...: immutable segments of up to ``chunk_size`` banners, named by the first 16 hex digits
  of their own sha256: ``key``, ``digest`` (sha256 of the image bytes, 16 hex digits) and the pooling components
  ``cls`` ``[n, blocks, D]``, ``mean`` and ``gem`` ``[n, D]`` (float16). Plain numpy:
  ``np.load(file, allow_pickle=False)["key"]``.
- ``manifest.json``: the segments with their sha256, the precision each was computed in, the listing identity ->
  digest cache (so unchanged images are not even read again), images that could not be used, the current
  *collection* (the (key, digest) of every banner of the last full run's images, in order, with names) and the
  last *sample* (``embed --limit``), which is read where no full collection was embedded yet.
- ``matches/``: saved top-k neighbours (:mod:`bannermatch.matches`); ``damaged/``: segments found damaged, set aside.
- ``.lock``: every change of the folder happens under an exclusive ``flock`` of it, on the manifest as it is on
  disk then (several notebooks and commands can embed into one pass at once: each adds its segments, none
  overwrites another's); a reader holds it shared while it reads the manifest and the segments it lists.

A row is identified by the digest of its image bytes: a new or changed banner has a new digest and is embedded;
an unchanged one is found; a removed one is no longer in the collection. Each segment is written and listed
under the lock, so a killed run loses at most one segment's work and leaves nothing half-listed; damaged
segments are found by their sha256, set aside and recomputed. Segment files the manifest does not list (a run
killed between the two writes) and matches of features no longer stored are removed under the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .defaults import DEFAULT_STORE
from .errors import BannermatchError
from .files import atomic_write, file_digest, folder_lock
from .pooling import COMPONENTS, needed_components, view
from .recipe import Recipe
from .sources import Entry
from .steam import NameIndex

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MATCHES = "matches"  # saved matches (bannermatch.matches)
DAMAGED = "damaged"  # segments found damaged, out of the way of glob("seg_*.npz")
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
    rows_id: str = ""  # the stored rows these features were read from (:meth:`FeatureStore.rows_id`)
    sample_of: int = 0  # a sample (``embed --limit``) of a listing of this many banners; 0: the whole collection

    @property
    def content_id(self) -> str:
        """Identifies these exact features (saved matches are keyed by it): the rows they were read from, each
        banner's key, bytes and the sha256 of the segment that holds its features, and the view."""
        return hashlib.sha256(f"{self.rows_id}\0{self.recipe.view}".encode()).hexdigest()[:16]

    @property
    def size(self) -> str:
        """``20 banners``, or ``5 banners, a sample of 20``."""
        return f"{len(self.keys)} banners" + (f", a sample of {self.sample_of}" if self.sample_of else "")

    def index_map(self) -> dict[str, int]:
        if getattr(self, "_index", None) is None or len(self._index) != len(self.keys):
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    def index_of(self, key: str) -> int:
        try:
            return self.index_map()[key]
        except KeyError:
            raise BannermatchError(f"{key!r} is not in this feature set ({self.size})") from None

    def name(self, key: str) -> str:
        return self.names.get(key, "")

    def name_index(self) -> NameIndex:
        """The names of this set's banners, indexed once for the searches of queries and the explorer."""
        if getattr(self, "_name_index", None) is None:
            index = self.index_map()
            self._name_index = NameIndex({k: v for k, v in self.names.items() if k in index})
        return self._name_index


class FeatureStore:
    """One forward pass's stored components, opened (or created) for a recipe.

    ``manifest`` is this process's copy: every change re-reads the file under the folder's lock and adds to it
    (:meth:`_updating`), and :meth:`feature_set` reads it again, so what other processes stored is never lost.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._rows: dict[str, tuple[int, int]] | None = None
        self._intact: set[tuple[str, str]] = set()  # (file, sha256) of segments checked: their files never change
        self.damaged: list[Path] = []  # segments found changed or damaged (their banners are embedded again)

    @classmethod
    def open(cls, path: str | Path, recipe: Recipe | None = None, create: bool = False) -> FeatureStore:
        path = Path(path)
        if not (path / MANIFEST).exists():
            if not create:
                raise BannermatchError(f"no feature set at {path} (no {MANIFEST}); run `bannermatch embed` first")
            path.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT_VERSION, "library": __version__, "recipe": recipe.pass_dict(),
                        "segments": [], "identities": {}, "failed": {}, "views": [], "collection": None,
                        "sample": None}
            return cls(path, manifest)
        manifest = _read_manifest(path)
        if recipe is not None and manifest["recipe"] != recipe.pass_dict():
            stored = manifest["recipe"]
            diff = ", ".join(f"{k}: stored {v!r}, asked {recipe.pass_dict().get(k)!r}"
                             for k, v in stored.items() if recipe.pass_dict().get(k) != v)
            raise BannermatchError(f"{path} holds features of another recipe ({diff}); choose another --store")
        return cls(path, manifest)

    def _reread(self) -> None:
        """The manifest as it is on disk now (another process may have changed it), if there is one."""
        if (self.path / MANIFEST).exists():
            self.manifest = _read_manifest(self.path)
            self._rows = None

    @contextlib.contextmanager
    def _updating(self):
        """A read-modify-write of the manifest: under the folder's exclusive lock, on the manifest as it is on
        disk; damaged segments are set aside, leftovers removed, and the manifest written if it changed."""
        with folder_lock(self.path):
            self._reread()
            before = json.dumps(self.manifest)
            self.rows()  # damaged segments are left out of it: a change to write
            self._set_aside_damaged()  # first: a recomputed segment may have the very bytes, and name, it had
            yield
            self._tidy()
            if json.dumps(self.manifest) != before or not (self.path / MANIFEST).exists():
                atomic_write(self.path / MANIFEST, lambda fh: fh.write(json.dumps(self.manifest).encode()))

    # ---------------------------------------------------------------------------------- rows

    def rows(self) -> dict[str, tuple[int, int]]:
        """digest -> (segment, row) of every intact stored banner. Damaged segments are left out (recomputed)."""
        if self._rows is None:
            self._rows = {}
            self.damaged = []
            intact = []
            for seg in self.manifest["segments"]:
                file = self.path / seg["file"]
                if (seg["file"], seg["sha256"]) not in self._intact:
                    if not (file.is_file() and file_digest(file) == seg["sha256"]):
                        self.damaged.append(file)
                        continue
                    self._intact.add((seg["file"], seg["sha256"]))
                intact.append(seg)
            self.manifest["segments"] = intact
            for s, seg in enumerate(intact):
                for r, digest in enumerate(seg["digests"]):
                    self._rows[digest] = (s, r)
        return self._rows

    def known(self, digest: str) -> bool:
        return digest in self.rows() or digest in self.manifest["failed"]

    def rows_id(self, entries: list[list[str]]) -> str | None:
        """Identifies the stored rows of ``entries`` ((key, digest) each): their keys, digests and the sha256 of
        the segments that hold them; None if one is not stored."""
        rows, segments = self.rows(), self.manifest["segments"]
        h = hashlib.sha256(json.dumps(self.manifest["recipe"], sort_keys=True).encode())
        for key, digest in entries:
            if digest not in rows:
                return None
            h.update(f"{key}\0{digest}\0{segments[rows[digest][0]]['sha256']}\n".encode())
        return h.hexdigest()[:16]

    def add_segment(self, entries: list[tuple[str, str]], components: dict[str, np.ndarray], run: dict,
                    identities: dict[str, str], failed: dict[str, str]) -> None:
        """Write one segment (``entries``: (key, digest) per row) and record it with what the run learnt. Rows
        another process stored meanwhile are left out: every banner is stored once."""
        arrays = {}
        for name in COMPONENTS:
            values = components[name]
            if not np.all(np.isfinite(values)) or np.abs(values).max(initial=0) > np.finfo(np.float16).max:
                raise BannermatchError(f"{self.path}: the model produced non-finite or out-of-range features")
            arrays[name] = values.astype(np.float16)
        with self._updating():
            rows = self.rows()
            new = [r for r, (_, digest) in enumerate(entries) if digest not in rows]
            if new:
                self._write_segment([entries[r] for r in new], {name: a[new] for name, a in arrays.items()}, run)
            self._learn(identities, failed)

    def _write_segment(self, entries: list[tuple[str, str]], arrays: dict[str, np.ndarray], run: dict) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array([k for k, _ in entries], dtype=str),
                 digest=np.array([d for _, d in entries], dtype=str), **arrays)
        data = buffer.getvalue()
        sha256 = hashlib.sha256(data).hexdigest()  # of the bytes written, never of what is at the name later
        file = f"seg_{sha256[:16]}.npz"  # named by its bytes: no two writers pick one name for different rows
        atomic_write(self.path / file, lambda fh: fh.write(data))
        self._intact.add((file, sha256))
        self.manifest["segments"].append({"file": file, "sha256": sha256, "rows": len(entries),
                                          "digests": [d for _, d in entries], **run})
        for r, (_, digest) in enumerate(entries):
            self._rows[digest] = (len(self.manifest["segments"]) - 1, r)

    def _learn(self, identities: dict[str, str], failed: dict[str, str]) -> None:
        self.manifest["identities"].update(identities)
        self.manifest["failed"].update(failed)

    def record(self, identities: dict[str, str], failed: dict[str, str], collection: dict | None = None,
               sample: dict | None = None) -> None:
        """Save what a run learnt (listing identities, unusable images, the collection or the sample)."""
        unchanged = not (identities or failed) and collection in (None, self.manifest["collection"]) \
            and sample in (None, self.manifest.get("sample"))
        if unchanged and not os.access(self.path, os.W_OK):
            return  # a read-only store and nothing new: nothing to write, so it stays usable
        # otherwise compared with the manifest on disk, under the lock: another run may have changed it meanwhile
        with self._updating():
            self._learn(identities, failed)
            if collection is not None:
                self.manifest["collection"] = collection
            if sample is not None:
                self.manifest["sample"] = sample

    def add_view(self, recipe: Recipe) -> None:
        """Remember a strategy that was asked for, so pickers (the explorer) list it."""
        entry = {"strategy": recipe.strategy, "n_last_blocks": recipe.n_last_blocks, "avgpool": recipe.avgpool}
        if entry not in self.manifest["views"]:
            with self._updating():
                if entry not in self.manifest["views"]:
                    self.manifest["views"].append(entry)

    def tidy(self) -> None:
        """Set damaged segments aside and remove leftovers (:meth:`_tidy`) now, as a writer starts, where there
        is a stored pass and the folder can be written."""
        if (self.path / MANIFEST).exists() and os.access(self.path, os.W_OK):
            with self._updating():
                pass

    def _set_aside_damaged(self) -> None:
        """Move damaged segments out of the folder (a plain ``glob("seg_*.npz")`` would read them) into
        ``damaged/``; they are no longer listed. Under the lock."""
        for file in self.damaged:
            if file.is_file():
                (self.path / DAMAGED).mkdir(exist_ok=True)
                file.replace(self.path / DAMAGED / file.name)
                log.warning("%s was changed or damaged: moved to %s", file, self.path / DAMAGED)
        self.damaged = []

    def _tidy(self) -> None:
        """Remove what nothing reads any more; under the lock, where no write is half done: segment files the
        manifest does not list (a run killed between writing one and listing it), temporary files of killed
        writes, and matches of features that are neither the collection's nor the sample's."""
        listed = {seg["file"] for seg in self.manifest["segments"]}
        for file in [*self.path.glob("seg_*"), *self.path.glob(f"{MANIFEST}.tmp*")]:
            if file.name not in listed:
                file.unlink(missing_ok=True)
        matches = self.path / MATCHES
        if not matches.is_dir():
            return
        current = {self.rows_id(c["entries"]) for c in (self.manifest["collection"], self.manifest.get("sample")) if c}
        kept = set()
        for meta in matches.glob("*.json"):
            try:
                rows_id = json.loads(meta.read_text()).get("rows")
            except (OSError, ValueError, AttributeError):
                rows_id = None
            if rows_id is not None and rows_id in current:
                kept.add(meta.name[:-len(".json")])
        for file in matches.iterdir():
            if file.is_file() and (file.name.rsplit(".", 1)[0] not in kept or file.suffix not in (".npz", ".json")):
                file.unlink(missing_ok=True)

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
        """The features of the stored collection (or of ``collection``) under ``recipe``'s strategy; where only a
        sample was embedded, of the sample, with a warning. Read under the folder's shared lock: one state."""
        with folder_lock(self.path, shared=True):
            self._reread()
            return self._feature_set(recipe, collection)

    def _feature_set(self, recipe: Recipe, collection: dict | None) -> FeatureSet:
        collection = collection or self.manifest.get("collection")
        if not collection and (collection := self.manifest.get("sample")):
            log.warning("%s holds only a sample (embed --limit) of %d of %d banners: reading the sample; embed "
                        "without --limit for all", self.path, len(collection["entries"]), collection["sample_of"])
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
                          collection.get("images", ""), digests, self.rows_id(collection["entries"]),
                          collection.get("sample_of", 0))


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
    """Every usable feature set under ``store`` (a pass that holds only a sample gives the sample, see
    :attr:`FeatureSet.sample_of`), once for each strategy that was asked for (explorer pickers)."""
    out = []
    for manifest in sorted(Path(store).glob(f"*/{MANIFEST}")):
        try:
            fstore = FeatureStore.open(manifest.parent)
            for v in fstore.manifest["views"] or [{"strategy": "simple", "n_last_blocks": 1, "avgpool": False}]:
                out.append(fstore.feature_set(Recipe.from_dict({**fstore.manifest["recipe"], **v})))
        except BannermatchError as exc:
            log.warning("ignoring %s: %s", manifest.parent, exc)
    return out

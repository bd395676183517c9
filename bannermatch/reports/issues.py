"""Banner issues: dark, light, blurry, low-information, grayscale, odd-size and odd-aspect banners, and Steam's
placeholders (one picture under many app ids), from the cached image measures."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..display import show_grid
from ..errors import BannermatchError
from ..store import FeatureSet
from .measures import image_measures
from .tables import write_csv, write_json


#: Each detector's threshold, on the measures of :func:`measure_image` (chosen on synthetic banners and the
#: scikit-image photos, where a clean image was never flagged and each edited one was):
ISSUE_THRESHOLDS = {
    "dark": 0.2,  # bright99 below: hardly a pixel brighter than 20% grey
    "light": 0.8,  # bright5 above: hardly a pixel darker than 80% grey
    "blurry": 25.0,  # laplacian below (sharp banners and photos: 100-800; a 2 px Gaussian blur: 3-33)
    "low_information": 1.5,  # entropy below, bits: mostly one or two flat tones (banners: 2.2-3, photos: 4-8)
    "grayscale": 8.0,  # chroma at most: no coloured pixel beyond JPEG noise
    "odd_size": 200,  # short side below, px (Steam serves 600x900 and 300x450; downloads keep 256x384)
    "odd_aspect": 0.1,  # height/width further than 10% from Steam's 2:3
    "placeholder": 5,  # one picture (identical pixels) under at least this many app ids
}
ISSUES = tuple(ISSUE_THRESHOLDS)


def _severity(issue: str, m: dict, t: float) -> float | None:
    """How far past its threshold a banner is for one issue (None: it does not have it); larger is worse."""
    aspect = m["height"] / m["width"] / 1.5 - 1
    value = {"dark": t - m["bright99"], "light": m["bright5"] - t, "blurry": t - m["laplacian"],
             "low_information": t - m["entropy"], "grayscale": t - m["chroma"] + 1e-9,
             "odd_size": t - min(m["width"], m["height"]), "odd_aspect": abs(aspect) - t}[issue]
    return value if value > 0 else None


@dataclass
class Issues:
    """Banners with issues: ``flagged[issue]`` lists them, the worst first."""

    features: FeatureSet
    measures: dict[str, dict]
    flagged: dict[str, list[str]]
    thresholds: dict[str, float]

    def counts(self) -> dict[str, int]:
        return {issue: len(keys) for issue, keys in self.flagged.items()}

    def keys_with(self, *issues: str) -> set[str]:
        """Banners with any of ``issues`` (every issue if none is named)."""
        _check_issues(issues)
        return {key for issue in (issues or ISSUES) for key in self.flagged[issue]}

    def of(self, key: str) -> list[str]:
        return [issue for issue, keys in self.flagged.items() if key in keys]

    def records(self) -> list[dict]:
        """One row per (issue, banner): issue, app id (key), name, and the banner's measures."""
        return [{"issue": issue, "key": key, "name": self.features.name(key),
                 **{m: v for m, v in self.measures.get(key, {}).items()}}
                for issue, keys in self.flagged.items() for key in keys]

    def to_json(self, path: str | Path) -> Path:
        return write_json(path, {"banners": len(self.features.keys), "thresholds": self.thresholds,
                                  "counts": self.counts(),
                                  "issues": {issue: [{"key": key, "name": self.features.name(key)} for key in keys]
                                             for issue, keys in self.flagged.items()}})

    def to_csv(self, path: str | Path) -> Path:
        columns = ["issue", "key", "name", "width", "height", "bright99", "bright5", "laplacian", "entropy", "chroma",
                   "pixels"]
        return write_csv(path, self.records(), columns)

    def summary(self) -> str:
        counts = ", ".join(f"{issue} {n}" for issue, n in self.counts().items())
        return f"{len(self.keys_with())} of {len(self.features.keys)} banners have issues: {counts}"

    def rows(self, per_issue: int = 12) -> list[tuple[str, list[tuple[str, float | None]]]]:
        return [(f"{issue} ({len(keys)})", [(key, None) for key in keys[:per_issue]])
                for issue, keys in self.flagged.items() if keys]

    def show(self, per_issue: int = 6, save: str | Path | None = None):
        """The worst examples of each issue found, one row per issue (a grid's columns: ``per_issue``)."""
        return show_grid(self.features, self.rows(per_issue), per_issue, save, empty="no issues found")


def _check_issues(issues: Iterable[str]) -> None:
    unknown = [i for i in issues if i not in ISSUES]
    if unknown:
        raise BannermatchError(f"unknown issue {', '.join(unknown)}; choose from: {', '.join(ISSUES)}")


def find_issues(features: FeatureSet, thresholds: dict[str, float] | None = None, progress: bool = True) -> Issues:
    """Dark, light, blurry, low-information, grayscale, odd-size and odd-aspect banners, and Steam's placeholders
    (one picture under many app ids), from :func:`image_measures` (cached) and ``ISSUE_THRESHOLDS`` (override any
    with ``thresholds``)."""
    _check_issues(thresholds or {})
    thresholds = {**ISSUE_THRESHOLDS, **(thresholds or {})}
    measures = image_measures(features, progress)
    flagged: dict[str, list[str]] = {}
    for issue in ISSUES[:-1]:
        found = [(s, key) for key, m in measures.items() if (s := _severity(issue, m, thresholds[issue])) is not None]
        flagged[issue] = [key for _, key in sorted(found, key=lambda f: -f[0])]
    by_picture: dict[str, list[str]] = {}
    for key, m in measures.items():
        by_picture.setdefault(m["pixels"], []).append(key)
    shared = sorted((keys for keys in by_picture.values() if len(keys) >= thresholds["placeholder"]), key=len, reverse=True)
    flagged["placeholder"] = [key for keys in shared for key in keys]
    return Issues(features, measures, flagged, thresholds)

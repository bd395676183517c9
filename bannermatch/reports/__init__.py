"""Reports: questions about a whole collection, beyond "what looks like X".

One verb each, like imagededup's: :func:`find_duplicates` (``duplicates``), :func:`find_unique` (``unique``),
:func:`find_issues` (``issues``), :func:`most_played` (``most_played``); :func:`exclusion` (``exclusion``) keeps a
query's own duplicates, or banners with issues, out of match lists. Each report has ``records()`` (JSON-ready
rows), ``to_json``, ``to_csv``, ``summary()`` and ``show()`` (a grid); :mod:`bannermatch.gallery` writes each as
an HTML page. The image measures they read come from one cached streaming pass (``measures``).
"""

from .duplicates import Calibration, DuplicateGroup, Duplicates, calibrate_threshold, find_duplicates
from .exclusion import Exclusion, exclusion
from .issues import ISSUE_THRESHOLDS, ISSUES, Issues, find_issues
from .most_played import CHARTS, STEAMSPY_API, MostPlayed, PlayedGame, most_played, most_played_apps
from .unique import UniqueBanners, find_unique

__all__ = [
    "CHARTS", "Calibration", "DuplicateGroup", "Duplicates", "Exclusion", "ISSUES", "ISSUE_THRESHOLDS", "Issues",
    "MostPlayed", "PlayedGame", "STEAMSPY_API", "UniqueBanners", "calibrate_threshold", "exclusion",
    "find_duplicates", "find_issues", "find_unique", "most_played", "most_played_apps",
]

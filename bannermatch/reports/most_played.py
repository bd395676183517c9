"""The most-played games (Steam's chart, SteamSpy's, or given app ids) and their look-alikes in the collection;
games the collection lacks have their banner fetched from the CDN and embedded with the features' recipe."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..display import show_grid
from ..errors import BannermatchError
from ..sources import SkipImage, decode_image
from ..steam import STEAM_API, STEAM_CDN, banner_url, http_get_json
from ..store import FeatureSet
from .exclusion import Exclusion
from .tables import write_csv, write_json

log = logging.getLogger(__name__)


STEAMSPY_API = "https://steamspy.com/api.php"
CHARTS = ("steam", "steamspy")


def most_played_apps(chart: str = "steam", n: int = 100, api: str | None = None, steamspy: str = STEAMSPY_API,
                     timeout: float = 10) -> list[tuple[str, str]]:
    """``(appid, name)`` of the currently most-played games, most played first: Steam's
    ``ISteamChartsService/GetMostPlayedGames`` (no names: ``""``) or SteamSpy's ``top100in2weeks``."""
    if chart not in CHARTS:
        raise BannermatchError(f"unknown chart {chart!r}; choose one of: {', '.join(CHARTS)}, or give app ids")
    try:
        if chart == "steam":
            url = f"{(api or STEAM_API).rstrip('/')}/ISteamChartsService/GetMostPlayedGames/v1/"
            ranks = http_get_json(url, timeout)["response"]["ranks"]
            apps = [(str(int(r["appid"])), "") for r in sorted(ranks, key=lambda r: int(r["rank"]))]
        else:
            url = f"{steamspy}?request=top100in2weeks"
            apps = [(str(int(a["appid"])), str(a.get("name", ""))) for a in http_get_json(url, timeout).values()]
    except urllib.error.HTTPError as exc:
        raise BannermatchError(f"{url} failed: HTTP {exc.code}") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise BannermatchError(f"{url} did not return a chart of games") from None
    return apps[:n]


@dataclass
class PlayedGame:
    """One game of the chart and its look-alikes in the collection."""

    rank: int
    appid: str
    name: str
    status: str  # "in collection", "fetched" (from the CDN, embedded now) or "unavailable: <why>"
    matches: list[tuple[str, float]] = field(default_factory=list)
    image: Image.Image | None = None  # the fetched banner of a game missing from the collection


@dataclass
class MostPlayed:
    """The look-alikes of each game of a chart (or of a given list of app ids)."""

    features: FeatureSet
    games: list[PlayedGame]
    k: int
    chart: str

    @property
    def fetched(self) -> list[PlayedGame]:
        """Games missing from the collection whose banners were fetched from the CDN and embedded."""
        return [g for g in self.games if g.status == "fetched"]

    @property
    def unavailable(self) -> list[PlayedGame]:
        return [g for g in self.games if g.status.startswith("unavailable")]

    def records(self) -> list[dict]:
        return [{"rank": g.rank, "appid": g.appid, "name": g.name, "status": g.status,
                 "matches": [{"key": key, "name": self.features.name(key), "score": round(score, 4)}
                             for key, score in g.matches]} for g in self.games]

    def to_json(self, path: str | Path) -> Path:
        return write_json(path, {"chart": self.chart, "k": self.k, "recipe": self.features.recipe.label,
                                  "fetched": [g.appid for g in self.fetched],
                                  "unavailable": [g.appid for g in self.unavailable], "games": self.records()})

    def to_csv(self, path: str | Path) -> Path:
        rows = [{"rank": g.rank, "appid": g.appid, "name": g.name, "status": g.status, "match_rank": r + 1,
                 "key": key, "match_name": self.features.name(key), "score": round(score, 4)}
                for g in self.games for r, (key, score) in enumerate(g.matches)]
        return write_csv(path, rows, ["rank", "appid", "name", "status", "match_rank", "key", "match_name", "score"])

    def summary(self) -> str:
        lines = [f"{len(self.games)} games of {self.chart}: {len(self.games) - len(self.fetched) - len(self.unavailable)} "
                 f"in the collection, {len(self.fetched)} fetched from the CDN, {len(self.unavailable)} unavailable"]
        lines += [f"  fetched: {g.name or g.appid} ({g.appid})" for g in self.fetched]
        lines += [f"  {g.status}: {g.name or g.appid} ({g.appid})" for g in self.unavailable]
        return "\n".join(lines)

    def rows(self, max_games: int | None = None) -> list[tuple[str, list[tuple[str | Image.Image, float | None]]]]:
        """Grid rows: each game (its fetched banner if it is not in the collection), then its matches."""
        return [(f"#{g.rank} {g.name or g.appid} ({g.appid})" + (", fetched from the CDN" if g.status == "fetched" else ""),
                 [(g.image if g.image is not None else g.appid, None), *g.matches])
                for g in [g for g in self.games if not g.status.startswith("unavailable")][:max_games]]

    def show(self, max_games: int = 10, save: str | Path | None = None):
        """Each game's top-k, one row per game, the game itself first."""
        return show_grid(self.features, self.rows(max_games), self.k + 1, save, empty="no games")


def _fetch_banner(appid: str, host: str, timeout: float) -> Image.Image | str:
    """A game's vertical banner from the CDN, or why it could not be had."""
    request = urllib.request.Request(banner_url(appid, host), headers={"User-Agent": "bannermatch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return decode_image(response.read())
    except urllib.error.HTTPError as exc:
        return "no vertical banner on the CDN" if exc.code == 404 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"cannot reach the CDN ({getattr(exc, 'reason', exc)})"
    except SkipImage as exc:
        return f"not usable ({exc})"


def most_played(
    features: FeatureSet,
    games: str | Sequence[str | int] = "steam",
    k: int = 10,
    n: int = 100,
    host: str = STEAM_CDN,
    api: str | None = None,
    steamspy: str = STEAMSPY_API,
    weights: str | Path | None = None,
    device: str | None = None,
    exclude: Exclusion | None = None,
    names: dict[str, str] | None = None,
    timeout: float = 10,
) -> MostPlayed:
    """The top-k look-alikes of the ``n`` most-played games (``games="steam"``: Steam's chart; ``"steamspy"``:
    SteamSpy's top 100 in two weeks; or a list of app ids). A game missing from the collection has its banner
    fetched from the CDN at ``host`` and embedded with the features' own recipe (``weights``: the features'
    local weights); games without a banner are listed as unavailable. ``names`` ({appid: name}, e.g. Steam's app
    list) names games the collection does not hold."""
    from ..query import query

    if isinstance(games, str):
        apps, chart = most_played_apps(games, n, api, steamspy, timeout), games
    else:
        apps, chart = [(str(a).strip(), "") for a in games][:n], "given app ids"
        if bad := [a for a, _ in apps if not a.isdigit()]:
            raise BannermatchError(f"app ids must be integers, got {', '.join(map(repr, bad[:5]))}")
    index = features.index_map()
    names = names or {}
    played = [PlayedGame(r + 1, appid, features.name(appid) or names.get(appid) or name,
                         "in collection" if appid in index else "")
              for r, (appid, name) in enumerate(apps)]
    for game in played:
        if not game.status:
            fetched = _fetch_banner(game.appid, host, timeout)
            game.status, game.image = ("fetched", fetched) if isinstance(fetched, Image.Image) else (
                f"unavailable: {fetched}", None)
            if game.image is None:
                log.warning("%s (%s): %s", game.name or "app", game.appid, fetched)
    asked = [g for g in played if not g.status.startswith("unavailable")]
    queries = [g.appid if g.image is None else g.image for g in asked]
    if queries:
        for game, result in zip(asked, query(features, queries, k=k, weights=weights, device=device, exclude=exclude)):
            game.matches = result.matches
    return MostPlayed(features, played, k, chart)

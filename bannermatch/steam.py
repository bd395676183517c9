"""Steam metadata: app lists, game names and banner URLs."""

from __future__ import annotations

import bisect
import collections
import functools
import heapq
import json
import logging
import os
import re
import socket
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from importlib import resources
from pathlib import Path

from .errors import BannermatchError
from .files import atomic_write

#: The current Steam CDN host for store assets; older hosts (e.g. steamcdn-a.akamaihd.net) also serve banners.
STEAM_CDN = "https://shared.akamai.steamstatic.com/store_item_assets"
#: The vertical library banner: 600x900 (served at 300x450 for most games).
VERTICAL_BANNER = "library_600x900.jpg"

APP_NAMES_FILE = "apps.json"

#: The Steam Web API; ``fetch_app_list`` reads this at call time, so tests can point it at a local server.
STEAM_API = "https://api.steampowered.com"
#: Environment variable holding a Steam Web API key, for ``IStoreService/GetAppList``.
API_KEY_ENV = "STEAM_API_KEY"
#: What to tell users when Steam cannot be reached.
OFFLINE_OPTIONS = ("work offline with --app-list FILE (the shipped 2021 list is the default) plus a reachable --host, "
                   "--archive PATH, or point `bannermatch embed` at a local folder of banners")
#: Package data: the 29,982 games that had a vertical banner in January 2021, ``{appid: name}``.
SHIPPED_APP_LIST = "apps_2021.json"
_USER_AGENT = "bannermatch (Steam banner similarity research)"

log = logging.getLogger(__name__)


def banner_url(appid: str | int, host: str = STEAM_CDN, filename: str = VERTICAL_BANNER) -> str:
    """The URL of a game's vertical banner on the Steam CDN."""
    return f"{host.rstrip('/')}/steam/apps/{appid}/{filename}"


def parse_app_list(data: object) -> dict[str, str]:
    """Turn any of the known app-list shapes into an ``{appid: name}`` mapping.

    Accepted: ``ISteamApps/GetAppList/v2`` (``{"applist": {"apps": [{"appid", "name"}]}}``),
    ``IStoreService/GetAppList`` (``{"response": {"apps": [...]}}``), a bare list of such records,
    and a plain ``{appid: name}`` mapping.
    """
    if isinstance(data, dict) and "applist" in data:
        data = data["applist"].get("apps") if isinstance(data["applist"], dict) else None
    elif isinstance(data, dict) and "response" in data:
        data = data["response"].get("apps") if isinstance(data["response"], dict) else None
    if isinstance(data, list):
        try:
            return {str(int(app["appid"])): str(app.get("name", "")) for app in data}
        except (TypeError, KeyError, ValueError) as exc:
            raise BannermatchError(f"app list records need an integer 'appid' ({exc!r})") from None
    if isinstance(data, dict) and all(str(k).isdigit() for k in data):
        return {str(k): str(v) for k, v in data.items()}
    raise BannermatchError(
        "unrecognised app list: expected {appid: name}, or the Steam Web API's GetAppList JSON"
    )


def load_app_names(path: str | Path) -> dict[str, str]:
    """Read an app list JSON file (any shape accepted by :func:`parse_app_list`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BannermatchError(f"app list not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BannermatchError(f"app list {path} is not valid JSON: {exc}") from None
    return parse_app_list(data)


def shipped_app_names() -> dict[str, str]:
    """The app list shipped with the package (:data:`SHIPPED_APP_LIST`): names offline, and the default first
    download, since every one of its games had a vertical banner (Steam's full list is mostly 404s)."""
    text = resources.files("bannermatch").joinpath("data", SHIPPED_APP_LIST).read_text(encoding="utf-8")
    return parse_app_list(json.loads(text))


def save_app_names(names: dict[str, str], path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(json.dumps(names, ensure_ascii=False, indent=0).encode("utf-8")))
    return path


class NetworkUnreachable(BannermatchError):
    """No answer from a host (no DNS, connection refused, timed out): the message names the offline options."""

    def __init__(self, what: str, exc: BaseException | str, options: str = OFFLINE_OPTIONS):
        self.what, self.reason = what, getattr(exc, "reason", exc)
        super().__init__(f"cannot reach {what} ({self.reason}); the network seems unreachable: {options}")

    def naming(self, options: str) -> NetworkUnreachable:
        """The same failure, naming the offline options of another command."""
        return NetworkUnreachable(self.what, self.reason, options)


def http_get_json(url: str, timeout: float = 10) -> object:
    """GET a JSON document. HTTP errors propagate as ``urllib.error.HTTPError``; no connection is a BannermatchError."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, "Accept": "application/json"})
    shown = re.sub(r"key=[^&]+", "key=***", url)  # never print the user's API key
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        raise NetworkUnreachable(shown, exc) from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BannermatchError(f"{shown} did not return JSON ({exc})") from None


def fetch_app_list(api: str | None = None, key: str | None = None, timeout: float = 10) -> dict[str, str]:
    """Every Steam app with a name, ``{appid: name}``, from the Steam Web API.

    With ``key`` or the ``STEAM_API_KEY`` environment variable: ``IStoreService/GetAppList/v1`` with
    ``include_games``, paged (games only: fewer 404s to check). Without: the keyless ``ISteamApps/GetAppList/v2``
    (every app: DLC, tools, soundtracks...). Apps with a blank name (placeholders) are left out.
    """
    api = (api or STEAM_API).rstrip("/")
    key = key or os.environ.get(API_KEY_ENV)
    if key:
        names = _fetch_store_app_list(api, key, timeout)
    else:
        try:
            names = parse_app_list(http_get_json(f"{api}/ISteamApps/GetAppList/v2/", timeout))
            unavailable = "it returned no apps" if not names else ""
        except NetworkUnreachable:
            raise
        except (urllib.error.HTTPError, BannermatchError) as exc:  # gone, or answering something else than an app list
            unavailable = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else str(exc)
        if unavailable:
            raise BannermatchError(f"Steam's ISteamApps/GetAppList/v2 is unavailable ({unavailable}); set {API_KEY_ENV} "
                                   "to use IStoreService/GetAppList instead, or pass --app-list FILE")
    return {appid: name for appid, name in names.items() if name.strip()}


def _fetch_store_app_list(api: str, key: str, timeout: float) -> dict[str, str]:
    names: dict[str, str] = {}
    last_appid = 0
    while True:
        query = urllib.parse.urlencode({"key": key, "include_games": "true", "max_results": 50000, "last_appid": last_appid})
        try:
            page = http_get_json(f"{api}/IStoreService/GetAppList/v1/?{query}", timeout)
        except urllib.error.HTTPError as exc:
            hint = " (is the key valid?)" if exc.code in (401, 403) else ""
            raise BannermatchError(f"Steam's IStoreService/GetAppList failed: HTTP {exc.code}{hint}") from None
        response = page.get("response") if isinstance(page, dict) else None
        if not isinstance(response, dict):
            raise BannermatchError("Steam's IStoreService/GetAppList returned an unexpected document")
        names.update(parse_app_list(response.get("apps", [])))
        if not response.get("have_more_results"):
            return names
        last_appid = int(response["last_appid"])


# Characters that vanish instead of separating words: apostrophes (so "Meier's", "Meier’s" and "Meiers" meet),
# and, by category, other symbols (™ ® © emoji: NFKD would spell ™ as "tm"), modifier symbols (` ´ ^ used as
# apostrophes) and invisible format characters (soft hyphen).
_VANISH_CHARS = "'\u2018\u2019\u02bc"
_VANISH_CATEGORIES = {"So", "Sk", "Cf"}
_ASCII_VANISH = re.compile(r"['`^]+")  # the ASCII members of the above
_ASCII_SEPARATOR = re.compile(r"[^0-9a-z]+")


@functools.lru_cache(maxsize=1 << 17)  # every Steam name fits: a NameIndex of another subset of them is built fast
def normalize_name(name: str) -> str:
    """Case-, accent- and punctuation-insensitive form of a game name, for searching.

    Every letter and digit of every script is kept, case-folded; Latin letters lose their accents, other
    scripts keep their marks (й, ガ, Hangul stay as written); symbols vanish; anything else separates words.
    """
    if name.isascii():  # nearly every Steam name: the same result as _normalize_any's, several times faster
        return _ASCII_SEPARATOR.sub(" ", _ASCII_VANISH.sub("", name.lower())).strip()
    return _normalize_any(name)


def _normalize_any(name: str) -> str:
    kept = []
    dropped = False
    for c in name:  # symbols go before NFKD, which would spell some of them out ("™" -> "TM")
        # a mark on a vanished symbol (an emoji's variation selector) goes with it
        dropped = c in _VANISH_CHARS or unicodedata.category(c) in _VANISH_CATEGORIES or (
            dropped and unicodedata.category(c).startswith("M"))
        if not dropped:
            kept.append(c)
    out = []
    base = ""  # the letter the next mark would sit on ("" after anything else)
    for c in unicodedata.normalize("NFKD", "".join(kept).casefold()):
        category = unicodedata.category(c)
        if category[0] in "LN":
            base = c if category[0] == "L" else ""
            out.append(c)
        elif category[0] == "M":
            if base and not unicodedata.name(base, "").startswith("LATIN"):
                out.append(c)
        else:
            base = ""
            out.append(" ")
    return " ".join(unicodedata.normalize("NFC", "".join(out)).split())


def _rank(appid: str) -> int:
    return int(appid) if appid.isdecimal() else 0


class NameIndex:
    """Game names prepared for :func:`search_names`: normalised once, so each search takes well under a millisecond
    over Steam's 30,000 games with banners.

    Names are held in the order ties are broken in (shorter normalised name, then smaller app id), so the best
    matches of each kind are the first ones found.
    """

    def __init__(self, names: dict[str, str]):
        rows = sorted((len(n), _rank(appid), appid, name, n) for appid, name in names.items()
                      for n in [normalize_name(name)])
        self._found = [(appid, name) for _, _, appid, name, _ in rows]
        self._normalized = [n for *_, n in rows]
        # prefix search: the normalised names in text order, with their places in tie-break order
        by_text = sorted(range(len(rows)), key=self._normalized.__getitem__)
        self._sorted = [self._normalized[i] for i in by_text]
        self._sorted_at = by_text
        # substring search: one string, one name a line (normalised names have no newline), and where each starts
        self._text = "".join(f"{n}\n" for n in self._normalized)
        self._starts = []
        offset = 0
        for n in self._normalized:
            self._starts.append(offset)
            offset += len(n) + 1

    def __len__(self) -> int:
        return len(self._found)

    def search(self, query: str, limit: int = 10) -> list[tuple[str, str]]:
        """``(appid, name)`` of the games whose name contains ``query``, best first (see :func:`search_names`)."""
        q = normalize_name(query)
        if not q or limit <= 0:
            return []
        first = bisect.bisect_left(self._sorted, q)
        exact_end = bisect.bisect_right(self._sorted, q, first)
        prefix_end = bisect.bisect_left(self._sorted, q + "\U0010ffff", exact_end)  # no normalised name holds U+10FFFF
        picked = self._sorted_at[first:exact_end][:limit]  # equal names keep their tie-break order (stable sort)
        picked += heapq.nsmallest(limit - len(picked), self._sorted_at[exact_end:prefix_end])
        at = 0
        while len(picked) < limit:
            at = self._text.find(q, at)
            if at < 0:
                break
            i = bisect.bisect_right(self._starts, at) - 1
            if not self._normalized[i].startswith(q):  # names starting with the query are already ranked above
                picked.append(i)
            at = self._starts[i] + len(self._normalized[i]) + 1  # the next name
        return [self._found[i] for i in picked]


_INDEXES: collections.OrderedDict[int, tuple[dict[str, str], NameIndex]] = collections.OrderedDict()


def name_index(names: dict[str, str] | NameIndex) -> NameIndex:
    """The :class:`NameIndex` of ``names``, built once and kept while the dict is unchanged (the last few dicts)."""
    if isinstance(names, NameIndex):
        return names
    cached = _INDEXES.get(id(names))
    if cached is not None and cached[0] == names:  # a copy, compared: a changed or recycled dict is not reused
        _INDEXES.move_to_end(id(names))
        return cached[1]
    index = NameIndex(names)
    _INDEXES[id(names)] = (dict(names), index)
    while len(_INDEXES) > 4:
        _INDEXES.popitem(last=False)
    return index


def search_names(names: dict[str, str] | NameIndex, query: str, limit: int = 10) -> list[tuple[str, str]]:
    """Games whose name contains ``query`` (case-, accent- and punctuation-insensitive), best first.

    Exact matches come first, then names starting with the query, then the others; within each, shorter
    names, then smaller app ids. ``names`` is an ``{appid: name}`` dict or a :class:`NameIndex` of one.
    """
    return name_index(names).search(query, limit)

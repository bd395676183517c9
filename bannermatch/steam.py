"""Steam metadata: app lists, game names and banner URLs."""

from __future__ import annotations

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

    def __init__(self, what: str, exc: BaseException):
        super().__init__(f"cannot reach {what} ({getattr(exc, 'reason', exc)}); "
                         f"the network seems unreachable: {OFFLINE_OPTIONS}")


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


def normalize_name(name: str) -> str:
    """Case-, accent- and punctuation-insensitive form of a game name, for searching."""
    name = unicodedata.normalize("NFKD", name)
    name = "".join(c for c in name if not unicodedata.combining(c))
    return re.sub(r"[^0-9a-z]+", " ", name.casefold()).strip()


def search_names(names: dict[str, str], query: str, limit: int = 10) -> list[tuple[str, str]]:
    """Games whose name contains ``query`` (case-insensitive), best first.

    Exact matches come first, then names starting with the query, then shorter names.
    """
    q = normalize_name(query)
    if not q:
        return []
    hits = []
    for appid, name in names.items():
        n = normalize_name(name)
        if q in n:
            hits.append(((n != q, not n.startswith(q), len(n), int(appid) if appid.isdigit() else 0), appid, name))
    hits.sort()
    return [(appid, name) for _, appid, name in hits[:limit]]

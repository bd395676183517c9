"""Steam metadata: app lists, game names and banner URLs."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from .errors import BannermatchError

#: The current Steam CDN host for store assets; older hosts (e.g. steamcdn-a.akamaihd.net) also serve banners.
STEAM_CDN = "https://shared.akamai.steamstatic.com/store_item_assets"
#: The vertical library banner: 600x900 (served at 300x450 for most games).
VERTICAL_BANNER = "library_600x900.jpg"

APP_NAMES_FILE = "apps.json"


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


def save_app_names(names: dict[str, str], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(names, ensure_ascii=False, indent=0, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


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

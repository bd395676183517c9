"""HTML gallery: the files it writes, escaping of hostile names, and the pages in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from bannermatch.cli import main
from bannermatch.errors import BannermatchError
from bannermatch import extract_features, make_recipe
from bannermatch.gallery import write_gallery
from bannermatch import find_matches
from bannermatch.steam import banner_url
from conftest import APPS, TINY_ARCH

PAYLOAD = "<script>window.__pwned=1</script>"
EVIL_KEY = "400"  # Portal, renamed below
EVIL_NAME = f'Portal {PAYLOAD} "quoted" & \'single\''
K = 5


@pytest.fixture(scope="module")
def evil_features(banner_dir, tiny_weights, tmp_path_factory):
    """The synthetic banners, with one game name that tries to inject a script (text and attributes)."""
    images = tmp_path_factory.mktemp("evil") / "banners"
    shutil.copytree(banner_dir, images)
    (images / "apps.json").write_text(json.dumps({**APPS, EVIL_KEY: EVIL_NAME}))
    recipe = make_recipe("dino_vits16", weights=tiny_weights, arch=TINY_ARCH)
    store = images.parent / "store"
    return extract_features(images, recipe, store, weights=tiny_weights, device="cpu", progress=False)


class _Page(HTMLParser):
    """The images, links and visible text of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.links, self.text, self.scripts = [], [], [], 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        self.text.append(data)


def _page_of(index: Path, key: str) -> Path:
    """The page the index links to under the banner of ``key``."""
    html = index.read_text()
    # the figure of the key: link to its page, then its app id in the caption
    for href, caption in re.findall(r'<a href="(pages/q\d+\.html)">.*?<figcaption>(.*?)</figcaption>', html):
        if f'<span class="bm-key">{key}</span>' in caption:
            return index.parent / href
    raise AssertionError(f"no page for {key}")


def test_local_gallery_writes_every_page_and_thumbnail(evil_features, tmp_path):
    index = write_gallery(evil_features, None, tmp_path / "gallery", k=K, progress=False)
    pages = sorted((tmp_path / "gallery" / "pages").glob("*.html"))
    thumbs = sorted((tmp_path / "gallery" / "thumbs").glob("*.jpg"))
    assert index == tmp_path / "gallery" / "index.html"
    assert len(pages) == len(thumbs) == len(evil_features.keys) == len(APPS)
    for thumb in thumbs:
        with Image.open(thumb) as img:
            assert (img.format, img.size) == ("JPEG", (150, 225))
    matches = find_matches(evil_features, K)
    ets2 = _Page(_page_of(index, "227300").read_text())
    # the query, then its matches in rank order, each with its thumbnail, lazy-loaded
    assert [img["alt"] for img in ets2.images] == ["Euro Truck Simulator 2"] + [
        evil_features.name(key) for key, _ in matches.of("227300")]
    assert all(img["loading"] == "lazy" for img in ets2.images)
    for img in ets2.images:
        assert (index.parent / "pages" / img["src"]).resolve().is_file()
    text = " ".join(ets2.text)
    for key, score in matches.of("227300"):
        assert key in text and f"{score:.3f}" in text
    index_page = _Page(index.read_text())
    assert len(index_page.images) == len(APPS)


def test_hostile_names_are_escaped_everywhere(evil_features, tmp_path):
    index = write_gallery(evil_features, None, tmp_path / "gallery", k=K, progress=False)
    written = [index, *(tmp_path / "gallery" / "pages").glob("*.html")]
    for file in written:
        html = file.read_text()
        assert "<script" not in html and "__pwned=1</script>" not in html
    evil_page = _page_of(index, EVIL_KEY)
    html = evil_page.read_text()
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt; &quot;quoted&quot; &amp; &#x27;single&#x27;" in html
    page = _Page(html)
    assert page.scripts == 0
    assert page.images[0]["alt"] == EVIL_NAME  # attribute value decodes back to the name, as text
    assert EVIL_NAME in "".join(page.text)


def test_cdn_gallery_links_steam_and_writes_no_images(evil_features, tmp_path):
    index = write_gallery(evil_features, ["Euro Truck Simulator 2", "Stardew Valley"], tmp_path / "cdn", k=3,
                          images="cdn", host="https://cdn.example")
    assert not (tmp_path / "cdn" / "thumbs").exists()
    assert len(list((tmp_path / "cdn" / "pages").glob("*.html"))) == 2
    srcs = [img["src"] for img in _Page(_page_of(index, "413150").read_text()).images]
    assert srcs[0] == banner_url("413150", "https://cdn.example") == "https://cdn.example/steam/apps/413150/library_600x900.jpg"
    assert len(srcs) == 4 and all(s.startswith("https://cdn.example/steam/apps/") for s in srcs)


def test_bad_image_mode_is_a_clear_error(evil_features, tmp_path):
    with pytest.raises(BannermatchError, match="image mode"):
        write_gallery(evil_features, None, tmp_path / "x", images="s3")


def test_gallery_command(evil_features, tiny_weights, tmp_path, capsys):
    recipe = ["--model", "dino_vits16", "--weights", str(tiny_weights), "--device", "cpu", "--quiet",
              "--arch", ",".join(f"{k}={v}" for k, v in TINY_ARCH.items())]
    out = tmp_path / "g"
    args = ["gallery", "Stardew Valley", "220", *recipe, "-k", "4", "--out", str(out)]
    assert main([*args, "--store", str(evil_features.path.parent)]) == 0
    assert f"open {out / 'index.html'}" in capsys.readouterr().out
    assert len(list((out / "pages").glob("*.html"))) == 2
    assert main([*args, "--store", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bannermatch: error: no features for") and "\n" not in err


# ------------------------------------------------------------------------------------------ headless Chromium

class _Chromium:
    """A headless Chromium driven over the DevTools protocol; records console errors and exceptions."""

    def __init__(self, binary: str):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="bannermatch-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,2400",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if match := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = match[1]
            elif not line and self.proc.poll() is not None:
                break
        if port is None:
            self.close()
            raise RuntimeError("chromium did not start its DevTools server")
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id, self.errors = 0, []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)

    def _record(self, event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(f"{details.get('text')} {details.get('exception', {}).get('description', '')}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(str(params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"])

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + 20  # every image decoded (or failed) before anything is checked
        while time.monotonic() < deadline:
            if self.evaluate("document.readyState === 'complete' && [...document.images].every(i => i.complete)"):
                return
            time.sleep(0.1)
        raise AssertionError(f"{url} did not finish loading")

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def chromium():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium): the browser checks did not run")
    pytest.importorskip("websocket", reason="pip package websocket-client (the dev extra) drives Chromium")
    browser = _Chromium(binary)
    yield browser
    browser.close()


def test_gallery_in_a_real_browser(evil_features, chromium, tmp_path):
    index = write_gallery(evil_features, None, tmp_path / "gallery", k=K, progress=False)
    chromium.open(index.as_uri())
    assert chromium.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length") == len(APPS)
    chromium.open(_page_of(index, EVIL_KEY).as_uri())
    assert chromium.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length") == 1 + K
    assert chromium.evaluate("document.querySelector('h1').textContent") == EVIL_NAME
    assert chromium.evaluate("document.querySelectorAll('script').length") == 0
    assert chromium.evaluate("typeof window.__pwned") == "undefined"
    assert chromium.errors == []


def test_browser_check_sees_console_errors(chromium, tmp_path):
    """The check above can fail: a broken image and a throwing script are both reported."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><link rel="icon" href="data:,"><img src="missing.jpg">'
                    "<script>throw new Error('boom')</script>")
    chromium.errors.clear()
    chromium.open(page.as_uri())
    assert chromium.evaluate("document.images[0].naturalWidth") == 0
    assert any("boom" in (e or "") for e in chromium.errors)
    assert any("ERR_FILE_NOT_FOUND" in (e or "") or "Failed to load" in (e or "") for e in chromium.errors)
    chromium.errors.clear()

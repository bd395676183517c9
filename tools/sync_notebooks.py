"""Writes what the notebooks take from one place: the "Open in Colab" badges (notebooks and README) and the
``PACKAGE`` default, both from ``bannermatch.defaults.PROJECT_URL``, and the install cell, one template for
all three with the extras each notebook's parameters need.

    python tools/sync_notebooks.py          # rewrite what differs
    python tools/sync_notebooks.py --check  # exit 1 and name what differs (tests/test_notebooks.py runs it)

Only those parts are touched; every other cell and the outputs (none: notebooks are stored clean) stay as they are.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
# Read from the file itself: importing the package would need torch and its other dependencies.
PROJECT_URL = runpy.run_path(str(ROOT / "bannermatch" / "defaults.py"))["PROJECT_URL"]

# The extras each notebook installs, as an expression of its parameters (install only what the run needs).
EXTRAS = {
    "match_steam_banners_with_DINO.ipynb": '"download"',
    "match_steam_banners_with_BEiT.ipynb": '"hf,download" if SOURCE == "hf" else "download"',
    "download_steam_webdataset.ipynb": '"download,img2dataset" if ENGINE == "img2dataset" else "download"',
}
INSTALL_TAG = "install"
PACKAGE_LINE = (f'PACKAGE = "git+{PROJECT_URL}"  # installed from here if missing: '
                'a git URL, a wheel/sdist path (e.g. on Google Drive) or "." in a clone')
# Runs before bannermatch exists, so it cannot call the library. A failure is one line (IPython shows a
# UsageError without a traceback) and stops "Run all"; pip's own pages are kept out of sight.
INSTALL_CELL = '''\
EXTRAS = {extras}
import importlib, os, subprocess, sys
from pathlib import Path
try:
    import bannermatch
except ImportError:  # Colab or a fresh environment: install it from PACKAGE, with the extras these parameters need
    url = PACKAGE if "://" in PACKAGE else Path(PACKAGE).expanduser().resolve().as_uri()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"bannermatch[{{EXTRAS}}] @ {{url}}"],
                         capture_output=True, text=True, env={{**os.environ, "GIT_TERMINAL_PROMPT": "0"}})
    if pip.returncode:
        from IPython.core.error import UsageError
        why = next((line.strip() for line in pip.stderr.splitlines() if line.strip().startswith(("fatal:", "ERROR:"))), "pip failed")
        raise UsageError(f"bannermatch could not be installed from PACKAGE = {{PACKAGE!r}} ({{why}}). "
                         "Set PACKAGE in the parameters cell to a git URL (git+https://...), a wheel or sdist path, or a clone's folder.")
    importlib.invalidate_caches()
%matplotlib inline'''
BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^)\s]*?/blob/[^/)\s]+/(?P<name>[^/)\s]+\.ipynb)")


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{PROJECT_URL.removeprefix('https://github.com/')}/blob/main/{name}"


def with_badges(text: str) -> str:
    return BADGE.sub(lambda m: colab_url(m["name"]), text)


def synced(name: str, nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(nb)  # a copy
    nb.cells[0].source = with_badges(nb.cells[0].source)
    tagged = lambda tag: next(c for c in nb.cells if tag in c.metadata.get("tags", []))  # noqa: E731
    params = tagged("parameters")
    lines = [line for line in params.source.splitlines() if not line.startswith("PACKAGE =")]
    params.source = "\n".join([PACKAGE_LINE, *lines])
    tagged(INSTALL_TAG).source = INSTALL_CELL.format(extras=EXTRAS[name])
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in EXTRAS:
        nb = nbformat.read(ROOT / name, as_version=4)
        new = synced(name, nb)
        if new != nb:
            stale.append(name)
            if not check:
                nbformat.write(new, ROOT / name)
    readme = (ROOT / "README.md").read_text()
    if with_badges(readme) != readme:
        stale.append("README.md")
        if not check:
            (ROOT / "README.md").write_text(with_badges(readme))
    if stale:
        print(("out of date: " if check else "rewrote: ") + ", ".join(stale))
    return int(check and bool(stale))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

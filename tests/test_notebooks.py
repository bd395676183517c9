"""The notebooks run top to bottom, headless, offline: parameters injected after the `parameters` cell
(papermill-style) point them at the synthetic banners, tiny local checkpoints and the shared Steam name list."""

from __future__ import annotations

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from bannermatch.defaults import PROJECT_URL
from bannermatch.sources import open_source
from conftest import APPS, SHARED_APPS, TINY_ARCH, StaticServer, draw_banner

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["match_steam_banners_with_DINO.ipynb", "match_steam_banners_with_BEiT.ipynb", "download_steam_webdataset.ipynb"]
QUERIES = ["Euro Truck Simulator 2", "Stardew Valley", "portal 2"]


def run_notebook(name: str, parameters: dict, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(ROOT / name, as_version=4)
    at = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs_of(nb, marker: str) -> list[dict]:
    cells = [cell for cell in nb.cells if cell.cell_type == "code" and marker in cell.source]
    assert len(cells) == 1, f"expected one cell with {marker!r}"
    return cells[0].outputs


def pngs(outputs) -> int:
    return sum("image/png" in out.get("data", {}) for out in outputs)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_clean(name):
    nb = nbformat.read(ROOT / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1
    steps = [cell for cell in code if "parameters" not in cell.metadata.get("tags", [])]  # settings, one a line
    assert max(len(cell.source.splitlines()) for cell in steps) <= 20  # library calls, no logic


def test_badges_and_install_default_are_the_project_url():
    """PROJECT_URL is written once: the badges (notebooks, README) and the install cells' default follow it."""
    repo = PROJECT_URL.removeprefix("https://github.com/")
    readme = (ROOT / "README.md").read_text()
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / name, as_version=4)
        badge = f"(https://colab.research.google.com/github/{repo}/blob/main/{name})"
        assert badge in nb.cells[0].source and badge in readme
        params = next(cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", []))
        assert f'PACKAGE = "git+{PROJECT_URL}"' in params.source
    assert readme.count("https://colab.research.google.com/github/") == len(NOTEBOOKS)
    # The rest the helper writes (the install cell, one template for all) is as it would write it.
    sync = subprocess.run([sys.executable, ROOT / "tools" / "sync_notebooks.py", "--check"], capture_output=True, text=True)
    assert sync.returncode == 0, sync.stdout + sync.stderr


def test_dino_notebook(banner_dir, tiny_weights, tmp_path):
    store = tmp_path / "data" / "features"
    with banner_cdn(["999001"]) as cdn:  # a most-played game the collection lacks
        nb = run_notebook("match_steam_banners_with_DINO.ipynb", {
            "MODEL": "dino_vits16", "STRATEGY": "simple", "K": 4, "IMAGES": str(banner_dir), "APP_LIST": str(SHARED_APPS),
            "STORE": str(store), "QUERIES": QUERIES, "WEIGHTS": str(tiny_weights), "ARCH": TINY_ARCH, "DEVICE": "cpu",
            "COMPARE_MODELS": ["dino_vits16", "dino_vitb16"],  # the tiny checkpoint fits every patch-16 DINO
            "EVAL_QUERIES": 4, "MOST_PLAYED": ["227300", "999001"], "CDN": cdn.url,
        }, tmp_path)
    assert pngs(outputs_of(nb, "show_matches(")) == len(QUERIES)
    assert pngs(outputs_of(nb, "compare_grid(")) == 1
    assert pngs(outputs_of(nb, "comparison.plot()")) == 1
    table = next(out["data"]["text/markdown"] for out in outputs_of(nb, "comparison.to_markdown()")
                 if "text/markdown" in out.get("data", {}))
    assert "dino_vits16 complex" in table and "dino_vitb16 simple" in table
    printed = "".join(out.get("text", "") for out in outputs_of(nb, "find_matches("))
    assert printed.startswith("Euro Truck Simulator 2 (227300):") and "Portal 2 (620):" in printed
    explorer = outputs_of(nb, "explore(")
    assert any("application/vnd.jupyter.widget-view+json" in out.get("data", {}) for out in explorer)
    # one forward pass per model serves both strategies, the main one among them
    assert len(list(store.glob("*/manifest.json"))) == 2
    assert len(list((store.parent / "gallery" / "pages").glob("*.html"))) == len(QUERIES)
    # the four collection reports: a summary, a grid and a gallery page each
    for call, summary, page in [("duplicates.show(", "duplicate groups", "duplicates"),
                                ("unique.show(", "most unique of 20 banners", "unique"),
                                ("issues.show(", "of 20 banners have issues", "issues"),
                                ("report.show(", "1 in the collection, 1 fetched from the CDN", "most_played")]:
        outputs = outputs_of(nb, call)
        assert summary in "".join(out.get("text", "") for out in outputs) and pngs(outputs) == 1
        assert (store.parent / "gallery" / f"{page}.html").is_file()


@pytest.fixture(scope="module")
def tiny_beit(tmp_path_factory) -> Path:
    """A tiny random BEiT saved as the published pt22k checkpoint is (what --weights takes for source hf)."""
    from published import save_beit_pt22k_hf

    return save_beit_pt22k_hf(tmp_path_factory.mktemp("tiny_beit"), {
        "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 96, "vocab_size": 64})


def test_beit_notebook(banner_dir, tiny_beit, tmp_path):
    store = tmp_path / "features"
    nb = run_notebook("match_steam_banners_with_BEiT.ipynb", {
        "K": 3, "IMAGES": str(banner_dir), "STORE": str(store), "QUERIES": QUERIES[:2], "WEIGHTS": str(tiny_beit),
        "DEVICE": "cpu",
    }, tmp_path)
    assert pngs(outputs_of(nb, "show_matches(")) == 2
    assert pngs(outputs_of(nb, "compare_grid(")) == 1
    views = {m.parent.name.split(".")[0]: sorted(v["strategy"] for v in json.loads(m.read_text())["views"])
             for m in store.glob("*/manifest.json")}  # one forward pass per model, read with both strategies
    assert views == {model: ["mean", "simple"]
                     for model in ("beit_base_pt22k", "beit_base_pt22k_ft22k", "beit_base_pt22k_ft22k_ft1k")}


def banner_cdn(served: list[str]) -> StaticServer:
    """The Steam CDN's path layout: synthetic banners for some app ids, 404 for the rest."""
    banners = {}
    for i, appid in enumerate(served):
        out = BytesIO()
        draw_banner(100 + i).save(out, "JPEG", quality=90)
        banners[f"/steam/apps/{appid}/library_600x900.jpg"] = out.getvalue()
    return StaticServer(banners)


def test_download_notebook(steam_names, tmp_path):
    served = ["227300", "413150", "367520"]
    with banner_cdn(served) as cdn:
        nb = run_notebook("download_steam_webdataset.ipynb", {
            "OUTPUT_DIR": str(tmp_path / "banners"), "APP_LIST": str(SHARED_APPS), "APPIDS": [*served, "10"],
            "HOST": cdn.url, "PROCESSES": 1, "THREADS": 4, "SHOW": 3,
        }, tmp_path)
    report = "".join(out.get("text", "") for out in outputs_of(nb, "download_banners("))
    assert "3 of 4 banners" in report and "1 without a vertical banner" in report
    source = open_source(tmp_path / "banners")
    assert sorted(source.keys) == sorted(served)
    assert source.names == {appid: steam_names[appid] for appid in served}
    assert pngs(outputs_of(nb, "plt.subplots(")) == 1


def test_download_notebook_reads_an_archive(banner_dir, tmp_path):
    import tarfile

    archive = tmp_path / "resized_vertical_steam_banners_v2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for appid in list(APPS)[:5]:
            tar.add(banner_dir / f"{appid}.jpg", f"data/resized_vertical_steam_banners/{appid}.jpg")
    nb = run_notebook("download_steam_webdataset.ipynb", {
        "OUTPUT_DIR": str(tmp_path / "banners"), "ARCHIVE": str(archive), "SHOW": 2}, tmp_path)
    printed = "".join(out.get("text", "") for out in outputs_of(nb, "open_source("))
    assert printed.startswith(f"5 banners, 5 with names, in {archive}")  # the archive has none: the shipped list
    assert pngs(outputs_of(nb, "plt.subplots(")) == 1

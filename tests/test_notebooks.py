"""The notebooks run top to bottom, headless, offline: parameters injected after the `parameters` cell
(papermill-style) point them at the synthetic banners, tiny local checkpoints and the shared Steam name list."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from bannermatch.sources import open_source
from conftest import APPS, SHARED_APPS, TINY_ARCH, draw_banner

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
def test_notebooks_are_stored_clean_with_a_colab_badge(name):
    nb = nbformat.read(ROOT / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert f"https://colab.research.google.com/github/bannermatch/bannermatch/blob/main/{name}" in nb.cells[0].source
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1
    assert max(len(cell.source.splitlines()) for cell in code) <= 20  # library calls, no logic


def test_dino_notebook(banner_dir, tiny_weights, tmp_path):
    pytest.importorskip("bannermatch.evaluate", reason="bannermatch.evaluate is not written yet")
    store = tmp_path / "data" / "features"
    nb = run_notebook("match_steam_banners_with_DINO.ipynb", {
        "MODEL": "dino_vits16", "STRATEGY": "simple", "K": 4, "IMAGES": str(banner_dir), "APP_LIST": str(SHARED_APPS),
        "STORE": str(store), "QUERIES": QUERIES, "WEIGHTS": str(tiny_weights), "ARCH": TINY_ARCH, "DEVICE": "cpu",
        "COMPARE_MODELS": ["dino_vits16", "dino_vitb16"],  # the tiny checkpoint fits every patch-16 DINO
        "EVAL_QUERIES": 4,
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


class _BannerCDN:
    """The Steam CDN's path layout on 127.0.0.1: synthetic banners for some app ids, 404 for the rest."""

    def __init__(self, served: list[str]):
        banners = {}
        for i, appid in enumerate(served):
            out = BytesIO()
            draw_banner(100 + i).save(out, "JPEG", quality=90)
            banners[f"/steam/apps/{appid}/library_600x900.jpg"] = out.getvalue()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = banners.get(self.path)
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "image/jpeg" if body else "text/plain")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_notebook(steam_names, tmp_path):
    pytest.importorskip("bannermatch.download", reason="bannermatch.download is not written yet")
    served = ["227300", "413150", "367520"]
    cdn = _BannerCDN(served)
    try:
        nb = run_notebook("download_steam_webdataset.ipynb", {
            "OUTPUT_DIR": str(tmp_path / "banners"), "APP_LIST": str(SHARED_APPS), "APPIDS": [*served, "10"],
            "HOST": cdn.url, "PROCESSES": 1, "THREADS": 4, "SHOW": 3,
        }, tmp_path)
    finally:
        cdn.close()
    report = "".join(out.get("text", "") for out in outputs_of(nb, "download_banners("))
    assert "3 of 4 banners" in report and "1 without a vertical banner" in report
    source = open_source(tmp_path / "banners")
    assert sorted(source.keys) == sorted(served)
    assert source.names == {appid: steam_names[appid] for appid in served}
    assert pngs(outputs_of(nb, "plt.subplots(")) == 1


def test_download_notebook_reads_an_archive(banner_dir, tmp_path):
    pytest.importorskip("bannermatch.download", reason="bannermatch.download is not written yet")
    import tarfile

    archive = tmp_path / "resized_vertical_steam_banners_v2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for appid in list(APPS)[:5]:
            tar.add(banner_dir / f"{appid}.jpg", f"data/resized_vertical_steam_banners/{appid}.jpg")
    nb = run_notebook("download_steam_webdataset.ipynb", {
        "OUTPUT_DIR": str(tmp_path / "banners"), "ARCHIVE": str(archive), "SHOW": 2}, tmp_path)
    printed = "".join(out.get("text", "") for out in outputs_of(nb, "open_source("))
    assert printed.startswith(f"5 banners, 0 with names, in {archive}")
    assert pngs(outputs_of(nb, "plt.subplots(")) == 1

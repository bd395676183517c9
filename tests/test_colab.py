"""The notebooks as a Colab user runs them: each copied alone into an empty folder, run top to bottom (papermill)
by a kernel in an environment with Colab's package versions (constraints/colab.txt), where the notebook's own
install cell installs bannermatch from a wheel of this checkout. Offline: pip may not fetch anything, and the
archive comes from a loopback HTTP server.

The environment takes minutes and gigabytes to build (torch's CUDA build), so .ci/run builds it once as
.venv-colab; BANNERMATCH_COLAB_PYTHON may name another one's python. Without it these tests skip, except in
CI (CI set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nbformat
import pytest

from conftest import APPS, TINY_ARCH, StaticServer
from test_notebooks import NOTEBOOKS, QUERIES, outputs_of, pngs, tiny_beit  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
COLAB_PYTHON = Path(os.environ.get("BANNERMATCH_COLAB_PYTHON") or ROOT / ".venv-colab" / "bin" / "python")
KERNEL = "bannermatch-colab-like"
BUILD = ("python3.11 -m venv .venv-colab && .venv-colab/bin/python -m pip install "
         "-c constraints/colab.txt -r constraints/colab.txt")
# Nothing of this checkout on the path (PYTHONPATH would show its bannermatch to the kernel and to pip freeze),
# and pip offline: no index, no local wheel folders, no configuration.
OFFLINE = {key: value for key, value in os.environ.items()
           if not key.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "JUPYTER"))}
OFFLINE.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")


def pip(python: Path, *args: str) -> str:
    proc = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, env=OFFLINE)
    assert proc.returncode == 0, f"pip {' '.join(args)}: {proc.stderr[-3000:]}"
    return proc.stdout


def freeze(python: Path) -> set[str]:
    return set(pip(python, "freeze", "--all").splitlines())


def pinned(line: str) -> str:
    return re.split(r"[=@ ]", line, maxsplit=1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def colab_python() -> Path:
    if not COLAB_PYTHON.is_file():
        reason = f"no Colab-like environment at {COLAB_PYTHON}: build it with `{BUILD}` or set BANNERMATCH_COLAB_PYTHON"
        if os.environ.get("CI") or "BANNERMATCH_COLAB_PYTHON" in os.environ:
            pytest.fail(reason)
        pytest.skip(reason)
    # The environment holds exactly Colab's versions (a stale one would test something else).
    wanted = {line.strip() for line in (ROOT / "constraints" / "colab.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    missing = wanted - freeze(COLAB_PYTHON)
    assert not missing, f"{COLAB_PYTHON} differs from constraints/colab.txt in {sorted(missing)}; rebuild it: {BUILD}"
    pip(COLAB_PYTHON, "uninstall", "-y", "-q", "bannermatch")  # left by an interrupted run: each test installs it
    return COLAB_PYTHON


@pytest.fixture(scope="module")
def wheel(colab_python, tmp_path_factory) -> Path:
    """`pip wheel --no-deps .` of this checkout (a copy of it: the build leaves files behind), built offline."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(ROOT / "bannermatch", src / "bannermatch", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    # With this environment's setuptools (the dev extra's): an isolated build would fetch one from the index.
    pip(Path(sys.executable), "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
    return next(out.glob("bannermatch-*.whl"))


@pytest.fixture(scope="module")
def kernel_env(colab_python, tmp_path_factory) -> dict[str, str]:
    """Environment for papermill, offline, with a kernel spec that starts the Colab-like python."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [str(colab_python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Colab-like", "language": "python"}))
    return {**OFFLINE, "JUPYTER_PATH": str(jupyter)}


@pytest.fixture
def colab(colab_python, kernel_env, tmp_path):
    """Runs one notebook alone in an empty folder; afterwards bannermatch is uninstalled again."""

    def run(name: str, parameters: dict) -> tuple[subprocess.CompletedProcess, nbformat.NotebookNode]:
        folder = tmp_path / "content"  # Colab's working directory: the notebook and nothing else
        folder.mkdir()
        shutil.copy(ROOT / name, folder)
        params = tmp_path / "parameters.json"
        params.write_text(json.dumps(parameters))
        out = tmp_path / f"out-{name}"
        proc = subprocess.run([sys.executable, "-m", "papermill", str(folder / name), str(out), "-k", KERNEL,
                               "--cwd", str(folder), "-f", str(params), "--no-progress-bar"],
                              env=kernel_env, capture_output=True, text=True, timeout=900)
        assert out.is_file(), proc.stderr[-3000:]
        return proc, nbformat.read(out, as_version=4)

    yield run
    pip(colab_python, "uninstall", "-y", "-q", "bannermatch")


def assert_installed_only_bannermatch(before: set[str], after: set[str]):
    assert not before - after, f"the install cell changed Colab's packages: {sorted(before - after)}"
    assert [pinned(line) for line in after - before] == ["bannermatch"], sorted(after - before)


def assert_ran_to_the_end(proc, nb):
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]


def torch_printed(nb) -> str:
    return "".join(out.get("text", "") for out in outputs_of(nb, "resolve_device("))


def test_dino_notebook_alone_in_colab(colab, colab_python, wheel, banner_dir, tiny_weights, tmp_path):
    before = freeze(colab_python)
    proc, nb = colab("match_steam_banners_with_DINO.ipynb", {
        "PACKAGE": str(wheel), "MODEL": "dino_vits16", "K": 4, "IMAGES": str(banner_dir),
        "STORE": str(tmp_path / "data" / "features"), "QUERIES": QUERIES, "WEIGHTS": str(tiny_weights),
        "ARCH": TINY_ARCH, "DEVICE": "cpu", "COMPARE_MODELS": ["dino_vits16"],
        "EVAL_QUERIES": 4, "MOST_PLAYED": ["227300", "413150"],  # no chart offline
    })
    assert_ran_to_the_end(proc, nb)
    assert_installed_only_bannermatch(before, freeze(colab_python))
    assert "torch 2.11.0" in torch_printed(nb)  # Colab's torch, not an upgrade
    assert pngs(outputs_of(nb, "show_matches(")) == len(QUERIES)
    assert pngs(outputs_of(nb, "compare_grid(")) == 1
    assert any("application/vnd.jupyter.widget-view+json" in out.get("data", {}) for out in outputs_of(nb, "explore("))


def test_beit_notebook_alone_in_colab(colab, colab_python, wheel, banner_dir, tiny_beit, tmp_path):
    before = freeze(colab_python)
    proc, nb = colab("match_steam_banners_with_BEiT.ipynb", {
        "PACKAGE": wheel.as_uri(), "K": 3, "IMAGES": str(banner_dir), "STORE": str(tmp_path / "features"),
        "QUERIES": QUERIES[:2], "WEIGHTS": str(tiny_beit), "DEVICE": "cpu", "COMPARE_MODELS": ["beit_base_pt22k"],
    })
    assert_ran_to_the_end(proc, nb)
    assert_installed_only_bannermatch(before, freeze(colab_python))
    assert "torch 2.11.0" in torch_printed(nb)
    assert pngs(outputs_of(nb, "show_matches(")) == 2
    assert pngs(outputs_of(nb, "compare_grid(")) == 1


def test_download_notebook_alone_in_colab(colab, colab_python, wheel, banner_dir, tmp_path):
    archive = tmp_path / "resized_vertical_steam_banners_v2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for appid in list(APPS)[:5]:
            tar.add(banner_dir / f"{appid}.jpg", f"data/resized_vertical_steam_banners/{appid}.jpg")
    before = freeze(colab_python)
    with StaticServer({f"/{archive.name}": archive.read_bytes()}) as host:
        proc, nb = colab("download_steam_webdataset.ipynb", {
            "PACKAGE": str(wheel), "ARCHIVE": f"{host.url}/{archive.name}", "SHOW": 2})
    assert_ran_to_the_end(proc, nb)
    assert_installed_only_bannermatch(before, freeze(colab_python))
    assert "".join(out.get("text", "") for out in outputs_of(nb, "open_source(")).startswith("5 banners")
    assert pngs(outputs_of(nb, "plt.subplots(")) == 1


@pytest.mark.parametrize("package", ["missing/bannermatch-0.1.0-py3-none-any.whl", "git+file:///nonexistent/bannermatch"])
def test_install_cell_pointed_at_nothing_says_what_to_set(colab, colab_python, package):
    before = freeze(colab_python)
    proc, nb = colab(NOTEBOOKS[0], {"PACKAGE": package})
    assert proc.returncode != 0
    install = next(cell for cell in nb.cells if "install" in cell.metadata.get("tags", []))
    shown = [line for out in install.outputs for line in
             (out.get("text", "").splitlines() if out.output_type == "stream" else out.get("traceback", []))]
    assert len(shown) == 1, shown  # one line, no traceback, no pip output
    assert f"PACKAGE = {package!r}" in shown[0] and "Set PACKAGE" in shown[0]
    later = nb.cells[nb.cells.index(install) + 1:]
    assert not any(cell.get("execution_count") for cell in later)  # "Run all" stopped there
    assert freeze(colab_python) == before

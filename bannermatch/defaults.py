"""Defaults shared by the Python API, the command line and the notebooks, each written once.

``PROJECT_URL`` is where the project is published: the notebooks install bannermatch from it by default and
their "Open in Colab" badges open it. After changing it, run ``python tools/sync_notebooks.py`` to rewrite
the badges and the notebooks' install default (a test checks that they agree).
"""

PROJECT_URL = "https://github.com/bannermatch/bannermatch"

DATA_DIR = "bannermatch_data"
DEFAULT_IMAGES = f"{DATA_DIR}/banners"  # the banner collection, downloaded here when absent
DEFAULT_STORE = f"{DATA_DIR}/features"  # the feature store: one folder per recipe

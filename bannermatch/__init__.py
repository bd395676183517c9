"""bannermatch: find Steam games whose store banners look alike, with self-supervised vision transformers.

The pipeline, one module per concern: ``steam`` (app lists, names), ``fetch``, ``snapshots``, ``download``
and ``collection`` (getting the banners), ``sources`` (reading them in place; the collection's index),
``backbones`` (models and their token layout), ``recipe`` (what names a feature set), ``pooling``
(strategies), ``extraction`` (the forward pass over a collection), ``store`` (features kept per banner
content), ``search`` (exact cosine top-k), ``matches`` (all-vs-all, cached), ``query``, ``reports``
(duplicates, unique banners, issues, most played), ``display``, ``explorer``, ``gallery``, ``evaluate``,
``cli``; ``defaults`` holds the shared defaults.
"""

__version__ = "0.2.0"

from .backbones import create_model, list_models  # noqa: E402
from .errors import BannermatchError  # noqa: E402
from .extraction import extract_features  # noqa: E402
from .matches import Matches, find_matches  # noqa: E402
from .query import query  # noqa: E402
from .recipe import Recipe, make_recipe, resolve_device  # noqa: E402
from .sources import open_source  # noqa: E402
from .store import DEFAULT_STORE, load_features, list_feature_sets  # noqa: E402

__all__ = [
    "BannermatchError", "DEFAULT_STORE", "Matches", "Recipe", "create_model", "extract_features", "find_matches",
    "list_feature_sets", "list_models", "load_features", "make_recipe", "open_source", "query", "resolve_device",
]

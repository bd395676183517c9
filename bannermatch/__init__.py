"""bannermatch: find Steam games whose store banners look alike, with self-supervised vision transformers.

The pipeline, one module per stage: ``steam`` (app lists, names), ``sources`` (images), ``models``
(backbones), ``features`` (recipes, embedding, the feature store), ``search`` (exact cosine top-k),
``display`` (grids), ``evaluate`` (numbers), ``cli``.
"""

__version__ = "0.1.0"

from .errors import BannermatchError  # noqa: E402
from .features import Recipe, extract_features, load_features, make_recipe  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .search import Matches, find_matches, query  # noqa: E402
from .sources import open_source  # noqa: E402

__all__ = [
    "BannermatchError", "Matches", "Recipe", "create_model", "extract_features", "find_matches",
    "list_models", "load_features", "make_recipe", "open_source", "query",
]

"""Drive the explorer as a user would, in a fresh process, and print what it showed as one JSON document.

tests/test_explorer.py runs it under each ipywidgets version (this venv's 8, and 7.7.1 as on Colab):
``python explorer_driver.py STORE``.
"""

import json
import re
import sys

import ipywidgets
from IPython.core.interactiveshell import InteractiveShell
from IPython.display import display
from IPython.utils.capture import capture_output

from bannermatch.explorer import explore

ex = explore(sys.argv[1], k=3)
steps = []


def record(action: str) -> None:
    steps.append({"action": action, "feature_set": ex.feature_set.value, "k": ex.k.value, "status": ex.status.value,
                  "options": list(ex.query.options),
                  "keys": re.findall(r'<span class="bm-key">([^<]+)</span>', ex.grid.value),
                  "images": ex.grid.value.count("data:image/jpeg;base64,")})


record("start")
ex.query.value = "euro truck"
record("type 'euro truck'")
ex.query.value = ex.query.options[-1]
record("pick the last suggestion")
ex.k.value = 5
record("k = 5")
ex.feature_set.value = 1 - ex.feature_set.value
record("other feature set")
ex.query.value = "PORTAL 2"
record("type 'PORTAL 2'")

InteractiveShell.instance()  # display() as in a notebook: ipywidgets 7 publishes the view, 8 returns a mime bundle
with capture_output() as shown:
    display(ex)
views = [out.data.get("application/vnd.jupyter.widget-view+json") for out in shown.outputs]
print(json.dumps({"ipywidgets": ipywidgets.__version__, "steps": steps, "model_id": ex.model_id, "views": views,
                  "widgets": [type(w).__name__ for w in (ex.feature_set, ex.query, ex.k, ex.status, ex.grid)]}))

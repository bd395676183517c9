"""The JSON and CSV writers every report shares."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write


def write_json(path: str | Path, data) -> Path:
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")))
    return path


def write_csv(path: str | Path, rows: list[dict], columns: Sequence[str]) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path

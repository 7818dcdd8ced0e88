"""Helpers shared by the benchmark scripts."""

import json


def write_json(path, rows) -> None:
    """Writes ``rows`` to ``path`` as indented JSON (nothing if ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {path}")

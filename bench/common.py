"""What every bench script ends with: the result saved as JSON, and one JSON line last on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_result(result: dict[str, Any], path: Path | None, shown: dict[str, Any] | None = None) -> None:
    """Writes ``result`` to ``path`` (unless None) and prints ``shown`` (default: ``result``) as one JSON line.

    Args:
        result: Everything measured.
        path: Where it goes (``bench/results/<name>.json``); None: not saved (quick runs).
        shown: What the last stdout line holds, when not all of ``result``.
    """
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result if shown is None else shown), flush=True)

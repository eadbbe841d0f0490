"""Small JSON files that record progress (resume state, stage markers, eval results): written
atomically so a kill leaves the old or the new file, and read leniently where absence or damage
just means "not done yet"."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

STAGE_MARKER = ".effqat_stage.json"  # written into a pipeline stage's folder once it is complete


def write_json_atomic(path, obj: Any, default: Optional[Callable] = None) -> None:
    """Write to a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json_or_empty(path) -> dict:
    """The JSON object at ``path``; {} when it is missing, unreadable, corrupt or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}

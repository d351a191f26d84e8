"""A content-addressed cache of computed artifacts.

Keys combine the SHA-256 of the checkpoint bytes with a hash of the settings
that influence the result, so a renamed checkpoint still hits the cache and
a changed setting misses it. Entries are JSON files written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flatness.atomic import atomic_write_text


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ArtifactCache:
    """JSON artifacts under ``root/<kind>-<key>.json``; counts what it had to compute."""

    def __init__(self, root: Path, version: str = "1") -> None:
        self.root = root
        self.version = version
        self.computed: list[str] = []
        self.reused: list[str] = []

    def path(self, kind: str, *parts: str) -> Path:
        key = hashlib.sha256("|".join((self.version, *parts)).encode()).hexdigest()[:24]
        return self.root / f"{kind}-{key}.json"

    def get_or_compute(self, kind: str, parts: tuple[str, ...], compute) -> Any:  # noqa: ANN001 - any callable
        path = self.path(kind, *parts)
        if path.exists():
            try:
                value = json.loads(path.read_text())
                self.reused.append(kind)
                return value
            except (OSError, json.JSONDecodeError):
                pass  # a damaged entry is recomputed
        value = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(value))
        self.computed.append(kind)
        return value

"""Keep server paths out of what clients see: error messages, progress and log events.

Paths under a configured directory become `<artifacts>/…`, `<models>/…`, `<cache>/…`, `<data>/…`
or `<state>/…`; any other absolute path keeps only its last part (`…/config.json`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

_ABS_PATH = re.compile(r"(?<![\w.<>:/])/(?:[^\s'\"`,;:()\[\]{}<>|*?]+/)+[^\s'\"`,;:()\[\]{}<>|*?]*")


def _roots(settings) -> list[tuple[str, str]]:
    roots = []
    for label, path in (("<artifacts>", getattr(settings, "artifacts", None)),
                        ("<models>", getattr(settings, "models_dir", None)),
                        ("<cache>", getattr(settings, "cache_dir", None)),
                        ("<data>", getattr(settings, "data_dir", None)),
                        ("<state>", getattr(settings, "state_dir", None)),
                        ("<tmp>", tempfile.gettempdir()),
                        ("<home>", os.path.expanduser("~"))):
        if path:
            for form in {str(path), str(Path(path).resolve())}:
                if len(form) > 1:
                    roots.append((form.rstrip("/"), label))
    return sorted(roots, key=lambda r: -len(r[0]))  # the most specific root first


def redact(text: Any, settings=None) -> Any:
    """`text` with server paths replaced (non-strings are returned as they are)."""
    if not isinstance(text, str) or "/" not in text:
        return text
    if settings is not None:
        for root, label in _roots(settings):
            text = text.replace(root, label)
    return _ABS_PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def redact_values(data: Any, settings=None) -> Any:
    """Every string inside dicts and lists, redacted."""
    if isinstance(data, dict):
        return {k: redact_values(v, settings) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_values(v, settings) for v in data]
    return redact(data, settings)

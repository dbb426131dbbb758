"""A Server-Sent Events parser over lines (as httpx's `iter_lines` gives them)."""

from __future__ import annotations

import json
from typing import Iterable, Iterator, Optional


def parse(lines: Iterable[str]) -> Iterator[tuple[Optional[str], str, str]]:
    """Yield (id, event, data) per dispatched event; comments (keepalives) are skipped."""
    event_id: Optional[str] = None
    event, data = "message", []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield event_id, event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id":
            event_id = value
    # An event not ended by a blank line (the connection broke mid-event) is discarded, as the spec says.


def parse_json(lines: Iterable[str]) -> Iterator[dict]:
    for _id, _event, data in parse(lines):
        yield json.loads(data)

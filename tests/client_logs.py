"""What the client library logged: it logs through `logging` (mqd.log.library_logger)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


class _Collector(logging.Handler):
    def __init__(self, into: list[dict[str, Any]]) -> None:
        super().__init__(logging.DEBUG)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "mqd_event", None)
        if event is not None:
            fields = getattr(record, "mqd_fields", {})
            entry = {"event": event, "log_level": record.levelname.lower(), **fields}
            if record.exc_info:
                entry["exc_info"] = True
            self._into.append(entry)


@contextlib.contextmanager
def capture_client_logs() -> Iterator[list[dict[str, Any]]]:
    """The client's log events, every level, as dicts ("event", "log_level", fields)."""
    logs: list[dict[str, Any]] = []
    logger = logging.getLogger("mqd.client")
    handler = _Collector(logs)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield logs
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)

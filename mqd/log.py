"""structlog set-up: readable console in a terminal, JSON lines otherwise (DESIGN.md §8)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(format_name: str = "auto", level: str = "info", **bound: str) -> None:
    """Configure structlog once per process; `bound` (node id, roles) goes on every line."""
    if format_name == "auto":
        format_name = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if format_name == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**bound)


def _to_stdlib(_logger: Any, _method: str, event_dict: dict[str, Any]) -> tuple[tuple, dict]:
    """The last processor of `library_logger`: one readable line for logging's own
    handlers ("event key=value …"), with the event and its fields kept on the record
    (`mqd_event`, `mqd_fields`) for handlers that want them whole."""
    event = str(event_dict.pop("event", ""))
    exc_info = event_dict.pop("exc_info", None)
    fields = " ".join(
        f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
        for key, value in event_dict.items()
    )
    return (f"{event} {fields}" if fields else event,), {
        "exc_info": exc_info,
        "extra": {"mqd_event": event, "mqd_fields": event_dict},
    }


def library_logger(name: str) -> Any:
    """A structlog logger for code that runs inside applications (the client library).

    It writes through the standard `logging` logger `name`, so the application
    chooses levels, handlers and destination (logging's defaults: warnings and
    errors to stderr, nothing below), and structlog's global configuration, which
    is the application's, is neither used nor changed.
    """
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.stdlib.filter_by_level, _to_stdlib],
        wrapper_class=structlog.stdlib.BoundLogger,
    )

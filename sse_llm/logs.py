"""Logging setup, shared by the CLI and every uvicorn worker process."""

from __future__ import annotations

from typing import Any


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` dictionary: readable lines on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "text": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "text"},
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # uvicorn's own loggers propagate to the root handler above.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": True},
        },
    }

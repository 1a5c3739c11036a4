"""Third-party log records nobody can act on, kept out of the plugin's output."""
from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet(*loggers: logging.Logger, level: int = logging.WARNING):
    """Only records of ``level`` and above from ``loggers`` while the block runs."""
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels):
            logger.setLevel(old)

"""How a Chorus process starts: read its settings once, configure logging, serve on uvloop."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from common.config import SettingError

T = TypeVar("T")


def run(name: str, configure: Callable[[], T], serve: Callable[[T], Coroutine[Any, Any, None]],
        log_level: Callable[[T], str]) -> int:
    """`configure()` reads the settings (a `SettingError` ends the process with exit code 2 and
    the variable's name); then `serve(settings)` runs until it returns. Returns the exit code."""
    try:
        settings = configure()
    except SettingError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=log_level(settings).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
    return 0

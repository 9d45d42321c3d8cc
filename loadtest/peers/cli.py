"""The command line every peer server takes, and serving an aiohttp app the same way for each."""

from __future__ import annotations

import argparse
import contextlib

from aiohttp import web


def server_arguments(prog: str) -> argparse.Namespace:
    """`--host`, `--port`, `--redis` (URL) and `--secret` (the benchmark's token secret)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--secret", required=True)
    return parser.parse_args()


def run_aiohttp(application: web.Application, args: argparse.Namespace) -> None:
    """Serve `application` on uvloop when the peers' venv has it, with no access log."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(application, host=args.host, port=args.port, print=None, access_log=None, backlog=4096)

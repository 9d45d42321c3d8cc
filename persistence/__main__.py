"""`python -m persistence COMMAND`: the schema's migrations, for operators (DATABASE_URL names the
database). Bad arguments, a missing DATABASE_URL or a revision alembic does not accept exit with 2."""

from __future__ import annotations

import argparse
import sys

from alembic.util import CommandError

from common.config import SettingError, env_url, environ
from persistence import migrate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m persistence", usage="%(prog)s migrate | current | history | downgrade REVISION",
        description="The schema's migrations; DATABASE_URL names the database.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog=parser.prog)
    commands.add_parser("migrate", help="bring the schema to the newest revision (alembic upgrade head)")
    commands.add_parser("current", help="the database's revision, and whether it is at head")
    commands.add_parser("history", help="every revision, newest first, the database's marked (current)")
    down = commands.add_parser("downgrade", help="undo migrations down to REVISION")
    down.add_argument("revision", metavar="REVISION",
                      help="a revision id, `base` (no tables) or -N (N steps back)")
    return parser


def _describe(database_url: str) -> str:
    """The database's revision and how it stands against head, in one line."""
    at = migrate.current(database_url)
    heads = tuple(r.id for r in migrate.revisions() if r.head)
    if set(at) == set(heads):
        return f"{', '.join(at)} (head)"
    return f"{', '.join(at) or 'base'} (not at head: head is {', '.join(heads)}; run `migrate`)"


def _history(database_url: str) -> list[str]:
    at = set(migrate.current(database_url))
    lines = []
    for revision in migrate.revisions():
        marks = [word for word, on in (("head", revision.head), ("current", revision.id in at)) if on]
        lines.append(f"{revision.id}  {revision.doc}" + (f"  ({', '.join(marks)})" if marks else ""))
    return [*lines, "base  no tables" + ("  (current)" if not at else "")]


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv[1:])  # exits with 2 and the usage on bad arguments
    try:
        url = env_url(environ(), "DATABASE_URL", ("postgresql", "postgres"))
    except SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "migrate":
            migrate.upgrade_head(url)
            print("migrations: at head")
        elif args.command == "current":
            print(f"current: {_describe(url)}")
        elif args.command == "history":
            print("\n".join(_history(url)))
        else:
            migrate.downgrade(url, args.revision)
            print(f"downgraded; current: {_describe(url)}")
    except CommandError as exc:  # an unknown revision, or one the database cannot go down to
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

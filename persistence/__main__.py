"""`python -m persistence migrate`: bring the schema to the newest revision (alembic upgrade head)."""

from __future__ import annotations

import sys

from common.config import SettingError, env_url, environ
from persistence.migrate import upgrade_head


def main(argv: list[str]) -> int:
    if argv[1:] != ["migrate"]:
        print("usage: python -m persistence migrate", file=sys.stderr)
        return 2
    try:
        url = env_url(environ(), "DATABASE_URL", ("postgresql", "postgres"))
    except SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    upgrade_head(url)
    print("migrations: at head")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

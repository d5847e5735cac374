"""`python -m app.bench [serve] ...`: the offline benchmark, or with `serve` the serving benchmark."""

from __future__ import annotations

import sys

from app.bench import offline, served


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return served.main(argv[1:])
    return offline.main(argv)


if __name__ == "__main__":
    sys.exit(main())

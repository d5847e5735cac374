"""`python -m app.bench [serve|load] ...`: the offline benchmark, with `serve` the serving benchmark, with `load`
the load and soak test (`app.bench.load`)."""

from __future__ import annotations

import sys

from app.bench import offline, served
from app.bench.load import cli as load


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return served.main(argv[1:])
    if argv[:1] == ["load"]:
        return load.main(argv[1:])
    return offline.main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""Ray job entrypoint: the `generate` stage. `python -m jobs.generate --config CONFIG`."""

from __future__ import annotations

import argparse

from jobs._entry import build_parser, run_job

STAGE = "generate"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser(STAGE).parse_args(argv)


def main(args: argparse.Namespace) -> None:
    run_job(STAGE, args)


if __name__ == "__main__":
    main(parse_args())

"""Ray job entrypoint: the whole pipeline (or --only one stage). `python -m jobs.pipeline --config CONFIG`."""

from __future__ import annotations

import argparse

from jobs._entry import build_parser, run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser(None).parse_args(argv)


def main(args: argparse.Namespace) -> None:
    run_job(None, args)


if __name__ == "__main__":
    main(parse_args())

"""Ray job entrypoint: the whole pipeline (or --only one stage). `python -m jobs.pipeline --config CONFIG`."""

from jobs._entry import entrypoints

parse_args, main = entrypoints(None)

if __name__ == "__main__":
    main(parse_args())

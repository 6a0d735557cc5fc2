"""Ray job entrypoint: the `evaluate` stage. `python -m jobs.evaluate --config CONFIG`."""

from jobs._entry import entrypoints

parse_args, main = entrypoints("evaluate")

if __name__ == "__main__":
    main(parse_args())

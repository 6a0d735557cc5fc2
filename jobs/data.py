"""Ray job entrypoint: the `data` stage. `python -m jobs.data --config CONFIG`."""

from jobs._entry import entrypoints

parse_args, main = entrypoints("data")

if __name__ == "__main__":
    main(parse_args())

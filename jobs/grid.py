"""Ray job entrypoint: the `grid` stage. `python -m jobs.grid --config CONFIG`."""

from jobs._entry import entrypoints

parse_args, main = entrypoints("grid")

if __name__ == "__main__":
    main(parse_args())

"""Ray job entrypoint: the `report` stage. `python -m jobs.report --config CONFIG`."""

from jobs._entry import entrypoints

parse_args, main = entrypoints("report")

if __name__ == "__main__":
    main(parse_args())

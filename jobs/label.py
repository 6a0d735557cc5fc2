"""Ray job entrypoint: the `label` stage. `python -m jobs.label --config CONFIG`."""

from jobs._entry import entrypoints

parse_args, main = entrypoints("label")

if __name__ == "__main__":
    main(parse_args())

"""Ray job entrypoint: the `split` stage. `python -m jobs.split --config CONFIG`."""

from jobs._entry import entrypoints

parse_args, main = entrypoints("split")

if __name__ == "__main__":
    main(parse_args())

"""Ray job entrypoint: the `generate` stage. `python -m jobs.generate --config CONFIG`."""

from jobs._entry import entrypoints

parse_args, main = entrypoints("generate")

if __name__ == "__main__":
    main(parse_args())

"""Ray job entrypoint: the `lora` stage. `python -m jobs.lora --config CONFIG`."""

from jobs._entry import entrypoints

parse_args, main = entrypoints("lora")

if __name__ == "__main__":
    main(parse_args())

"""Ray job entrypoints: `python -m jobs.pipeline --config CONFIG` and one module per stage.

Each is importable (`parse_args(argv)`, `main(args)`) and thin: the work lives in t2id's stages.
"""

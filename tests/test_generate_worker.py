"""The generation worker's pipeline call: an empty negative prompt is passed as None."""

from __future__ import annotations

import numpy as np

from t2id.generate.worker import ImageGenerator, pipeline_negative_prompt


class FakePipe:
    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        n = len(kwargs["prompt"])
        return type("Out", (), {"images": [np.zeros((8, 8, 3), np.float32)] * n})()


def _generator(batched: bool) -> tuple[ImageGenerator, FakePipe]:
    gen = object.__new__(ImageGenerator)  # render() needs only these attributes, not the model
    pipe = FakePipe()
    gen.pipe, gen.device, gen.steps, gen.guidance, gen.width, gen.height = pipe, "cpu", 2, 7.5, 8, 8
    gen.batched_pipeline = batched
    return gen, pipe


def test_empty_negative_prompt_is_none_so_sdxl_uses_zeroed_negative_embeddings():
    assert pipeline_negative_prompt(["", " "]) is None
    assert pipeline_negative_prompt(["blurry", "blurry"]) == ["blurry", "blurry"]
    for batched in (False, True):
        gen, pipe = _generator(batched)
        gen.render(["a", "b"], ["", ""], [1, 2])
        assert pipe.calls and all(call["negative_prompt"] is None for call in pipe.calls)
        gen, pipe = _generator(batched)
        gen.render(["a", "b"], ["blurry", "blurry"], [1, 2])
        assert [n for call in pipe.calls for n in call["negative_prompt"]] == ["blurry", "blurry"]

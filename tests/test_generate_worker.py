"""The generation worker: an empty negative prompt is passed as None; channels_last draws the same images."""

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


def test_channels_last_draws_the_same_images(tmp_path, torch_one_thread):
    """generate.channels_last (issue 17): NHWC UNet and VAE on the real tiny pipeline; the images equal the
    default layout's up to summation order (at most one grey level)."""
    import torch

    from t2id.generate.config import GenerateConfig
    from t2id.generate.settings import GenerateSettings
    from t2id.store import open_store

    images = {}
    for channels_last in (False, True):
        g = GenerateConfig(width=64, height=64, steps=2, channels_last=channels_last)
        s = GenerateSettings(generate=g, target_classes=[{"name": "vocal fold", "prompts": ["scan of the vocal fold"]}],
                             base_model="tiny", allow_network=False, run_seed=0, use_adapter=False, folds=None,
                             clip_weights=None)
        worker = ImageGenerator(s, open_store(str(tmp_path / "store")), None, str(tmp_path / "cache"))
        images[channels_last] = worker.render(["scan of the vocal fold"] * 2, ["", ""], [3, 4])
        convs = [m.weight for part in (worker.pipe.unet, worker.pipe.vae) for m in part.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        assert all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in convs)
    for plain, nhwc in zip(images[False], images[True]):
        assert np.abs(plain.astype(int) - nhwc.astype(int)).max() <= 1
    assert not np.array_equal(images[False][0], images[False][1])  # the seeds drew different images

"""bench/bench_gpu.py --tiny: the GPU benchmark's code paths, run on CPU with the tiny SDXL."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_tiny_runs_every_section_of_the_gpu_benchmark(tmp_path, capsys, monkeypatch):
    # In this process (the script's own main, as `python bench/bench_gpu.py --tiny` runs it): a subprocess
    # would only add an interpreter start and the torch/diffusers imports.
    monkeypatch.chdir(tmp_path)  # ultralytics writes its run folder under the working directory
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--json", str(out)])
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["matmul_tflops"] > 0
    assert len(results["lora"]) == 3 and results["lora"][2]["channels_last"] is True
    lora = {row["precision"]: row for row in results["lora"][:2]}
    assert set(lora) == {"no", "bf16"}
    for row in results["lora"]:  # t2id's train_step ran, with a loss, and the FLOP count saw the UNet
        assert row["loss_finite"] and row["img_s"] > 0 and row["forward_gflop_per_image"] > 0
        assert 0 < row["mfu_vs_measured_matmul"] < 1
    assert lora["bf16"]["frozen_dtype"] == "bfloat16" and lora["no"]["frozen_dtype"] == "float32"
    paths = {(row["path"], row["batch"]) for row in results["generate"]}
    assert ("diffusers, adapter unfused (PEFT)", 2) in paths and ("t2id: adapter fused, batched", 2) in paths
    assert ("t2id: fused, batched, channels_last", 2) in paths
    assert all(row["img_s"] > 0 for row in results["generate"])
    assert results["detector"]["images"] > 0 and results["detector"]["optimizer_steps"] >= 1
    for section in ("lora ", "generate ", "detector ", "total "):
        assert section in stdout

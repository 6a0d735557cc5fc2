"""Config: one model, extra="forbid", errors that name the path, value and fix."""

from pathlib import Path

import pytest
import yaml

from t2id.config import REPO_CONFIGS, dump_config, load_config, validate_config
from t2id.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo", "t2id-cas", "demo-classify"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO_CONFIGS / f"{name}.yaml")
    assert cfg.run.id


def test_paper_config_holds_the_paper_settings():
    cfg = load_config(REPO_CONFIGS / "t2id-cas.yaml")
    assert (cfg.lora.epochs, cfg.lora.batch_size, cfg.lora.lr, cfg.lora.mixed_precision) == (100, 16, 1e-4, "fp16")
    assert cfg.lora.hflip
    assert [c.name for c in cfg.lora.target_classes] == ["tracheal ring", "vocal fold"]
    assert (cfg.generate.images_per_class, cfg.generate.width, cfg.generate.guidance) == (300, 512, 7.5)
    det = cfg.grid.detector
    assert (det.imgsz, det.batch, det.lr, det.weight_decay, det.dropout) == (320, 64, 1e-3, 0.01, 0.1)
    assert cfg.split.folds == 4


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "lora:\n  rnak: 4\n"))
    assert "lora.rnak: unknown key; did you mean 'rank'?" in str(exc.value)


def test_unknown_section_lists_allowed_keys(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "nonsense: {}\n"))
    msg = str(exc.value)
    assert "nonsense: unknown key" in msg and "lora" in msg


def test_out_of_range_value_names_path_and_value(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "lora:\n  rank: 0\n"))
    assert str(exc.value) == f"{tmp_path / 'config.yaml'}: lora.rank: must be > 0, got 0"


def test_wrong_type_is_one_line_per_problem(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "grid:\n  detector:\n    imgsz: big\nsplit:\n  folds: 1\n"))
    lines = str(exc.value).splitlines()
    assert len(lines) == 2
    assert any("grid.detector.imgsz:" in line and "'big'" in line for line in lines)
    assert any("split.folds: must be >= 2, got 1" in line for line in lines)


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"config.yaml: line \d+, column \d+ is not valid YAML"):
        load_config(write(tmp_path, "run:\n  id: [unclosed\n"))


def test_yaml_is_loaded_safely(tmp_path):
    # A python object tag must not construct anything: safe_load refuses it.
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "run: !!python/object/apply:os.system ['echo pwned']\n"))


def test_bad_run_id_and_stage(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "run:\n  id: 'a/b'\n  stages: [data, trian]\n"))
    msg = str(exc.value)
    assert "run.id:" in msg and "run.stages:" in msg and "trian" in msg


def test_defaults_filled_and_roundtrip(tmp_path):
    cfg = load_config(write(tmp_path, "run:\n  id: x\n"))
    shown = yaml.safe_load(dump_config(cfg))
    assert shown["lora"]["rank"] == cfg.lora.rank
    assert validate_config(shown) == cfg


def test_overrides_apply_dotted_keys(tmp_path):
    cfg = load_config(write(tmp_path, "run:\n  id: x\n"), overrides={"store.uri": "/tmp/elsewhere"})
    assert cfg.store.uri == "/tmp/elsewhere"


def test_errors_never_echo_values_that_may_be_credentials(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "cluster:\n  env:\n    AWS_SECRET_ACCESS_KEY: hunter2-secret\n"))
    assert "cluster.env" in str(exc.value)
    assert "hunter2" not in str(exc.value)


def test_k8s_configs_validate():
    for path in sorted((REPO_CONFIGS.parent / "k8s").rglob("config.yaml")):
        load_config(path)


def test_stand_in_metric_networks_only_with_the_tiny_model(tmp_path):
    real = "lora:\n  base_model: s3://b/models/sdxl\n"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, real))
    msg = str(exc.value)
    assert "evaluate.inception_weights and evaluate.clip_weights are 'tiny'" in msg
    assert "t2id models cache" in msg and len(msg.splitlines()) == 1 and "got {" not in msg  # no config dump
    weights = "evaluate:\n  inception_weights: s3://b/models/inception.pth\n  clip_weights: s3://b/models/clip\n"
    assert load_config(write(tmp_path, real + weights)).lora.base_model == "s3://b/models/sdxl"
    with pytest.raises(ConfigError, match="evaluate.clip_weights is 'tiny'"):
        load_config(write(tmp_path, real + "evaluate:\n  inception_weights: /w/inception.pth\n"))
    # without the evaluate stage only the generate CLIP gate needs CLIP
    no_eval = real + "run:\n  stages: [data, split, lora, generate]\n"
    load_config(write(tmp_path, no_eval))
    with pytest.raises(ConfigError, match="evaluate.clip_weights is 'tiny'"):
        load_config(write(tmp_path, no_eval + "generate:\n  quality:\n    min_clip_score: 20\n"))
    assert load_config(write(tmp_path, "lora:\n  base_model: tiny\n")).evaluate.inception_weights == "tiny"


def test_is_splits_cannot_exceed_the_images_per_class(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluate.is_splits=10 > generate.images_per_class=4.*is_splits <= 4"):
        load_config(write(tmp_path, "generate:\n  images_per_class: 4\n"))
    load_config(write(tmp_path, "generate:\n  images_per_class: 4\nevaluate:\n  is_splits: 4\n"))

"""The installed transformers/peft pair can do text-encoder LoRA; a config asking for it on an
environment that cannot fails at validation with one line naming the key and the fix."""

from pathlib import Path

import pytest

import t2id.compat
from t2id.compat import peft_pair_problem, text_encoder_lora_problem
from t2id.config import load_config
from t2id.errors import ConfigError, UserError


def test_this_environment_can_do_text_encoder_lora():
    # A fresh install that resolves transformers >= 5.24 with peft < 0.22 fails here, by name,
    # instead of as "The version of PEFT you are using is not compatible" deep in a trainer.
    problem = text_encoder_lora_problem()
    assert problem is None, f"{problem} (pyproject.toml bounds transformers; requirements.lock pins the pair)"


@pytest.mark.parametrize(("transformers", "peft", "min_peft", "ok"), [
    ("5.23.0", "0.21.2", "0.20.0", True),
    ("5.24.0", "0.21.2", "0.22.0", False),   # the release that broke fresh installs
    ("5.24.0", "0.22.0", "0.22.0", True),
    ("4.57.6", "0.13.0", "0.5.0", True),
    ("4.30.0", "0.13.0", None, True),        # no MIN_PEFT_VERSION to read: transformers decides
])
def test_pair_rule(transformers, peft, min_peft, ok):
    problem = peft_pair_problem(transformers, peft, min_peft)
    assert (problem is None) == ok
    if not ok:
        assert f"peft >= {min_peft}" in problem and peft in problem and "requirements.lock" in problem


def test_missing_peft_is_named():
    assert "peft, which is not installed" in peft_pair_problem("5.23.0", None, "0.20.0")


def test_config_asking_for_text_encoder_lora_on_a_bad_pair_is_one_line(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(t2id.compat, "installed_peft_pair", lambda: ("5.24.0", "0.21.2", "0.22.0"))
    path = tmp_path / "config.yaml"
    path.write_text("lora:\n  train_text_encoder: true\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert len(msg.splitlines()) == 1
    assert "lora.train_text_encoder" in msg and "peft >= 0.22.0" in msg and "make install" in msg
    path.write_text("lora:\n  train_text_encoder: false\n")
    assert load_config(path).lora.train_text_encoder is False  # only the option that needs it fails


def test_trainer_refuses_a_bad_pair_as_a_user_error(monkeypatch):
    # Workers may run a different image than the machine that validated the config.
    from t2id.lora.config import LoraConfig
    from t2id.lora.train import add_text_encoder_lora

    monkeypatch.setattr(t2id.compat, "installed_peft_pair", lambda: ("5.24.0", "0.21.2", "0.22.0"))
    with pytest.raises(UserError, match=r"lora.train_text_encoder: text-encoder LoRA needs peft >= 0.22.0"):
        add_text_encoder_lora(object(), LoraConfig())

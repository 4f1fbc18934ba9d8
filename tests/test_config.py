"""Config: every problem at once, with file:line, the key, the bad value and a fix; overrides; recipes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunesmith.config import Config, load_config, parse_override
from tunesmith.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_all_problems_reported_with_lines_and_suggestions(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: smollm2-135m-instruct\n"
        "data:\n"
        "  train: x.jsonl\n"
        "  max_lenght: 12\n"
        "method: lora\n"
        "lora:\n"
        "  r: -1\n"
        "train:\n"
        "  lr: fast\n"
        "  epochs: 3\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value).splitlines() == [
        f"{recipe}: 3 problems in the configuration:",
        f"  {recipe}:4: unknown key 'data.max_lenght'; did you mean 'data.max_length'?",
        f"  {recipe}:7: lora.r: expected greater than or equal to 1 (got -1)",
        f"  {recipe}:9: train.lr: expected a valid number or 'auto' (got 'fast')",
    ]


def test_unknown_method_and_section(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, [("method", "qlora"), ("lorra.r", 4)])
    text = str(err.value)
    assert (
        "method: expected 'full', 'freeze', 'lora', 'dora', 'ia3', 'prefix', 'prompt' or 'adapter' (got 'qlora')"
        in text
    )
    assert "unknown key 'lorra'; did you mean 'lora'?" in text


def test_overrides_parse_values_like_the_command_line():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("lora.target=[q_proj,v_proj]") == ("lora.target", ["q_proj", "v_proj"])
    assert parse_override("train.max_steps=20") == ("train.max_steps", 20)
    cfg = load_config(None, [parse_override("model=/models/x"), parse_override("data.train=a/b.jsonl")])
    assert cfg.model.name == "/models/x"
    assert cfg.name == "b"
    assert cfg.run_dir() == Path("runs/b")
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_override("train.lr")


def test_invalid_yaml_names_the_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  lr: 1\n   epochs: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(recipe)


def test_resolved_config_round_trips():
    import yaml

    cfg = load_config(None, [("data.train", "t.jsonl"), ("train.lr", 1e-4), ("lora.r", 8)])
    again = Config.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_are_found():
    assert RECIPES, "no recipes found"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads_and_its_data_exists(recipe):
    cfg = load_config(recipe)
    for split in ("train", "validation", "test"):
        path = getattr(cfg.data, split)
        if path:
            assert Path(path).is_file(), f"{recipe.name}: data.{split} {path} does not exist"


def test_eval_format_must_be_a_regular_expression(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: x.jsonl\neval:\n  format: 'Answer: (.+\\nWhy: .+'\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert f"{recipe}:4: eval.format:" in str(err.value)
    assert "not a valid regular expression (missing ), unterminated subpattern" in str(err.value)
    recipe.write_text("data:\n  train: x.jsonl\neval:\n  format: 'Answer: .+\\nConfidence: (high|low)'\n")
    fmt = load_config(recipe).eval.format  # single-quoted YAML keeps \n for the regular expression to read
    assert fmt == r"Answer: .+\nConfidence: (high|low)"
    assert re.fullmatch(fmt, "Answer: yes\nConfidence: low") and not re.fullmatch(fmt, "Answer: yes Confidence: low")

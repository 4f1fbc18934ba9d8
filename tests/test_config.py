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


# ----------------------------------------------------------------------------------------------------
# Issue #21: data.strict, and recipes the loader must refuse without a traceback


def test_data_strict_is_a_checked_bool():
    assert load_config(None, {"data.strict": True}).data.strict is True
    assert load_config(None).data.strict is False
    with pytest.raises(ConfigError) as err:
        load_config(None, {"data.strict": "sometimes"})
    assert str(err.value).endswith("data.strict: expected a valid boolean (got 'sometimes')")


def test_recipe_that_is_not_utf8(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model: smollm2-135m-instruct\ndata:\n  train: caf\xe9.jsonl\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == f"{recipe}:3: invalid UTF-8 byte 0xE9; save the recipe with UTF-8 encoding"


def test_recipe_nested_too_deeply(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == f"{recipe}: nested too deeply; a recipe is a mapping of sections two levels deep"


def test_data_path_no_file_can_have(tmp_path):
    from tunesmith.data.formats import read_examples
    from tunesmith.errors import DataError

    recipe = tmp_path / "r.yaml"
    recipe.write_text('data:\n  train: "a\\0b.jsonl"\n  validation: "' + "x" * 5000 + '.jsonl"\n')
    cfg = load_config(recipe)
    assert cfg.data.train == "a\0b.jsonl"
    with pytest.raises(DataError, match="no such file"):
        read_examples(cfg.data.train)
    with pytest.raises(DataError, match="no such file"):
        read_examples(cfg.data.validation)


def test_yaml_alias_bomb_gives_a_short_message(tmp_path):
    # each level repeats the one before 9 times: 9**6 strings, whose full repr is ~300 kB per problem
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("\n".join(["x:", *("  " + line for line in lines), "lora:", "  target: *a5", ""]))
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert max(len(p) for p in err.value.problems) < 600  # the bad value shown abridged (reprlib)
    assert "unknown key 'x'" in str(err.value)

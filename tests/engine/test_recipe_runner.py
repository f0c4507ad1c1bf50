"""Recipes as users type them: the default configuration, and fixable mistakes as one message with exit status 2."""

from __future__ import annotations

import importlib
import logging

import pytest
from trl import TrlParser

from hf_tuning.recipe_runner import check_setting_names, run_recipe, training_started, with_default_config
from tests.helpers import REPO_ROOT

RECIPES = ("agrimatech_llama_dt3", "image_classification_dt", "dit_chain_of_forgetting")


def test_default_config_is_added_only_when_none_is_given():
    assert with_default_config(["--lr", "1"], "d.yaml") == (["--config", "d.yaml", "--lr", "1"], "d.yaml", True)
    assert with_default_config(["--config", "a.yaml"], "d.yaml") == (["--config", "a.yaml"], "a.yaml", False)
    assert with_default_config(["--config=a.yaml", "--x"], "d.yaml")[0] == ["--config", "a.yaml", "--x"]
    with pytest.raises(ValueError, match="needs a YAML file path"):
        with_default_config(["--config"], "d.yaml")


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_has_a_main_config_whose_settings_it_knows(recipe):
    module = importlib.import_module(f"recipes.{recipe}")
    assert module.DEFAULT_CONFIG.is_file(), module.DEFAULT_CONFIG
    parser_types = _parser_of(module)
    check_setting_names(parser_types, ["--config", str(module.DEFAULT_CONFIG)])  # raises on an unknown key


def _parser_of(module) -> TrlParser:
    captured = {}

    class Capture(TrlParser):
        def parse_args_and_config(self, args=None, **kwargs):
            captured["parser"] = self
            raise SystemExit(0)

    original = module.TrlParser
    module.TrlParser = Capture
    try:
        with pytest.raises(SystemExit):
            module.parse_args(["--config", str(module.DEFAULT_CONFIG)])
    finally:
        module.TrlParser = original
    return captured["parser"]


def test_misspelt_settings_name_the_closest_valid_one(tmp_path):
    from recipes import agrimatech_llama_dt3 as recipe

    parser = _parser_of(recipe)
    with pytest.raises(ValueError, match=r"unknown option --lora_rr \(did you mean --lora_r"):
        check_setting_names(parser, ["--lora_rr", "3"])
    config = tmp_path / "typo.yaml"
    config.write_text("learning_rate: 0.001\nlora_rank: 8\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown setting 'lora_rank' \(did you mean .*lora_r"):
        check_setting_names(parser, ["--config", str(config)])
    config.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        check_setting_names(parser, ["--config", str(config)])
    check_setting_names(parser, ["--lora-r", "8", "--use_peft", "--config", str(recipe.DEFAULT_CONFIG)])


def test_user_errors_are_one_message_before_training_and_tracebacks_after(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    seen = []

    def fails_early(argv):
        seen.append(argv)
        raise ValueError("data.jsonl:3: messages: expected a list")

    assert run_recipe(fails_early, default_config=config, argv=[], prog="r.py") == 2
    assert seen == [["--config", str(config)]]
    err = capsys.readouterr().err
    assert f"r.py: reading {config} (the default" in err
    assert "r.py: error: data.jsonl:3: messages: expected a list" in err and "Traceback" not in err

    assert run_recipe(fails_early, default_config=config, argv=["--debug"], prog="r.py") == 2
    assert "Traceback" in capsys.readouterr().err

    assert run_recipe(lambda argv: None, default_config=tmp_path / "missing.yaml", argv=[], prog="r.py") == 2
    assert "configuration file" in capsys.readouterr().err

    def fails_in_training(argv):
        training_started()
        raise ValueError("a bug deep inside training")

    with pytest.raises(ValueError, match="a bug deep inside"):
        run_recipe(fails_in_training, default_config=config, argv=[], prog="r.py")
    with pytest.raises(RuntimeError):  # not a user error: never hidden
        run_recipe(lambda argv: (_ for _ in ()).throw(RuntimeError("x")), default_config=config, argv=[])


def test_lora_run_does_not_warn_about_recipe_settings(caplog):
    from recipes.agrimatech_llama_dt3 import RecipeArguments

    with caplog.at_level(logging.WARNING, logger="hf_tuning.llm.tuning"):
        RecipeArguments(chat_template="chatml", license="apache-2.0", base_model_id="me/base")
    assert "ignores" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="hf_tuning.llm.tuning"):
        RecipeArguments(snell_rank=16)
    assert "ignores --snell_rank" in caplog.text


def test_flagship_command_without_arguments_reads_the_flagship_config_and_explains_the_missing_model(capsys):
    """``accelerate launch recipes/agrimatech_llama_dt3.py`` offline (tests/conftest.py), where the Llama model is in
    no cache: what its ``__main__`` runs, in-process (a subprocess would spend 10 s importing the same modules)."""
    from recipes import agrimatech_llama_dt3 as recipe

    assert run_recipe(recipe.main, default_config=recipe.DEFAULT_CONFIG, argv=[], prog="agrimatech_llama_dt3.py") == 2
    err = capsys.readouterr().err
    assert "reading " in err and "configs/agrimatech_llama_dt3.yaml (the default" in err
    assert "'meta-llama/Llama-3.1-8B-Instruct' is not a local folder or file" in err
    assert "HF_HUB_OFFLINE is set" in err
    assert "Traceback" not in err


def test_recipe_scripts_run_through_the_runner():
    """Each recipe's ``__main__`` hands ``main`` to :func:`run_recipe` with its default config."""
    for name in RECIPES:
        source = (REPO_ROOT / "recipes" / f"{name}.py").read_text()
        assert "sys.exit(run_recipe(main, default_config=DEFAULT_CONFIG))" in source, name
        assert "training_started()" in source, name


def test_a_finished_or_refused_run_leaves_its_process_group_and_a_crash_keeps_it(tmp_path):
    import torch.distributed as dist

    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    stores = iter(range(3))

    def joins_a_group(argv):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store-{next(stores)}", rank=0, world_size=1)

    def refused(argv):
        joins_a_group(argv)
        raise ValueError("bad row")

    def crashed(argv):
        joins_a_group(argv)
        training_started()
        raise RuntimeError("a bug")

    try:
        assert run_recipe(joins_a_group, default_config=config, argv=[]) == 0 and not dist.is_initialized()
        assert run_recipe(refused, default_config=config, argv=[]) == 2 and not dist.is_initialized()
        with pytest.raises(RuntimeError, match="a bug"):
            run_recipe(crashed, default_config=config, argv=[])
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

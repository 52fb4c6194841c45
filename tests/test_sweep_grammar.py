"""search.space entries in Hydra's sweep grammar: every form, bad expressions, and one identity
for the grammar and the dict form."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sweeper.settings import sweep_grammar
from sweeper.settings.config import ParamSpec, to_config, validate
from sweeper.settings.errors import UserError
from sweeper.settings.recipe import identity
from tests.test_config import CONF, compose_cfg
from tests.test_study import sweep


@pytest.mark.parametrize("name, expression, spec", [
    ("depth", "choice(1,2,3)", ParamSpec("categorical", choices=[1, 2, 3])),
    ("depth", "1,2,3", ParamSpec("categorical", choices=[1, 2, 3])),
    ("family", "choice(mlp,cnn)", ParamSpec("categorical", choices=["mlp", "cnn"])),
    ("width", "range(32,1024,step=32)", ParamSpec("int", low=32, high=1024, step=32)),
    ("dropout", "range(0.1,0.5,0.1)", ParamSpec("float", low=0.1, high=0.5, step=0.1)),
    ("dropout", "interval(0,0.5)", ParamSpec("float", low=0.0, high=0.5)),
    ("depth", "interval(1,4)", ParamSpec("int", low=1, high=4)),
    ("depth", "int(interval(1,4))", ParamSpec("int", low=1, high=4)),
    ("lr", "tag(log, interval(1e-4,3e-3))", ParamSpec("float", low=1e-4, high=3e-3, log=True)),
    ("width", "tag(log, int(interval(32,1024)))", ParamSpec("int", low=32, high=1024, log=True)),
])
def test_every_form_reaches_the_same_spec_from_the_command_line_and_from_yaml(
        name, expression, spec):
    from_cli = compose_cfg(*sweep_grammar.rewrite(["+experiment=smoke",
                                                   f"search.space.{name}={expression}"]))
    validate(from_cli)
    assert from_cli.search.space[name] == spec
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw = compose(config_name="config", overrides=["+experiment=smoke"])
    OmegaConf.set_struct(raw, False)
    raw.search.space[name] = expression  # as YAML: `depth: choice(1,2,3)`
    assert to_config(raw).search.space[name] == spec


def test_a_parameter_changes_kind_from_the_command_line():
    # Failed before: Hydra merged the dict into the int entry ("Key 'choices' is not in struct").
    for value in ("{type: categorical, choices: [1,2,3]}", "choice(1,2,3)"):
        cfg = compose_cfg(*sweep_grammar.rewrite(["+experiment=smoke",
                                                  f"search.space.depth={value}"]))
        assert cfg.search.space["depth"] == ParamSpec("categorical", choices=[1, 2, 3])
    cfg = compose_cfg(*sweep_grammar.rewrite(["+experiment=smoke", "search.space.depth=null",
                                              "+search.space.batch_size=choice(64,128)"]))
    assert "depth" not in cfg.search.space
    assert cfg.search.space["batch_size"].choices == [64, 128]


def test_a_dict_without_type_changes_only_the_fields_it_names():
    cfg = compose_cfg(*sweep_grammar.rewrite(["+experiment=smoke",
                                              "search.space.width={low: 32, high: 64}"]))
    assert cfg.search.space["width"] == ParamSpec("int", low=32, high=64, log=True)


def test_an_integer_parameter_cannot_be_a_float_range():
    cfg = compose_cfg("+experiment=smoke", "search.space.depth.type=float")
    with pytest.raises(UserError, match="depth takes integers; use type: int"):
        validate(cfg)


def test_grammar_and_dict_form_give_one_study_identity():
    def ident(*overrides: str) -> dict:
        cfg = compose_cfg(*sweep_grammar.rewrite(["+experiment=smoke", *overrides]))
        return identity(cfg, "content")

    dict_form = ident("search.space.width={type: int, low: 16, high: 128, log: true}",
                      "search.space.dropout={type: float, low: 0, high: 0.5}")
    grammar = ident("search.space.width=tag(log, int(interval(16,128)))",
                    "search.space.dropout=interval(0,0.5)")
    assert grammar == dict_form
    assert ident("search.space.width=interval(16,128)") != dict_form


@pytest.mark.parametrize("expression, message", [
    ("choice()", "empty choice is not legal"),
    ("interval(1)", "missing a required argument"),
    ("tag(foo, interval(1,2))", "unknown tag"),
    ("tag(log, choice(1,2))", "applies to interval only"),
    ("shuffle(range(1,4))", "shuffle() means nothing"),
    ("choice(1,2", "write one of choice("),
])
def test_bad_expressions_are_one_line(expression, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        sweep_grammar.rewrite([f"search.space.depth={expression}"])
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_a_scalar_is_not_a_search_space_entry():
    with pytest.raises(UserError, match="not a search space entry"):
        sweep_grammar.spec_of("depth", "3")


def test_other_overrides_pass_through_unchanged():
    args = ["+experiment=smoke", "search.space.depth.high=3", "~search.space.lr", "seed=1"]
    assert sweep_grammar.rewrite(args) == args


@pytest.mark.slow
def test_grammar_runs_a_study_from_the_command_line(tmp_path):
    result = sweep(tmp_path, "+experiment=smoke", "search.n_trials=1", "trainer.max_epochs=1",
                   "search.space.depth=choice(1)", "search.space.width=range(16,32,step=16)",
                   "search.space.dropout=null", "search.space.lr=tag(log, interval(1e-3,2e-3))")
    assert result.returncode == 0, result.stderr
    assert "[1/1] trial   0 COMPLETE depth=1 width=" in result.stdout
    shown = sweep(tmp_path, "+experiment=smoke", "search.space.depth=choice(1,2)", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr  # Hydra's own flags still work
    assert "choices:" in shown.stdout and "- 2" in shown.stdout
    bad = sweep(tmp_path, "+experiment=smoke", "search.space.depth=choice(1,2")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("sweeper: error: search.space.depth=choice(1,2:")

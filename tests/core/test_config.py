"""Configs are the one source of every option: checks, CLI flags, defaults and help all come from the fields."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

import sumcircuit as sc
from sumcircuit.cli import build_parser, main
from sumcircuit.cli.generate import add_config, config_from_args
from sumcircuit.config import POSITIVE, Config, config_fields, flag_of, option
from sumcircuit.registry import Registry, RegistryError


@dataclass(frozen=True)
class Toy(Config):
    mode: Literal["zero", "mean"] = option("zero", help="how")
    batch_size: int = option(4, help="documents per pass", bound=POSITIVE)
    rate: float = option(0.5, help="a rate")
    layers: tuple[int, ...] = option((), help="layers", normalize=lambda v: tuple(sc.parse_layers(v)) if v else ())
    tag: str | None = option(None, help="a tag")
    cka: bool = option(True, help="compute CKA")


def test_values_are_checked_and_errors_name_the_parameter() -> None:
    assert Toy(layers="2-4").layers == (2, 3, 4)
    assert Toy(layers=[3, 1]).layers == (1, 3)
    cases = [(dict(mode="max"), "mode: choose one of 'zero', 'mean', got 'max'"),
             (dict(batch_size=0), "batch_size: must be >= 1, got 0"),
             (dict(batch_size="4"), "batch_size: expected an integer, got '4' (str)"),
             (dict(batch_size=True), "batch_size: expected an integer, got True (bool)"),
             (dict(rate=float("nan")), "rate: must be a finite number, got nan"),
             (dict(layers="two"), "layers: layers two: expected a layer index"),
             (dict(tag=3), "tag: expected a string, got 3 (int)"),
             (dict(cka="no"), "cka: expected True or False, got 'no' (str)")]
    for kwargs, message in cases:
        with pytest.raises(sc.ConfigError) as err:
            Toy(**kwargs)  # type: ignore[arg-type]
        assert str(err.value).startswith(message), (kwargs, str(err.value))
        assert err.value.param == next(iter(kwargs))


def test_operation_configs_refuse_what_they_were_not_given() -> None:
    """The API's configs check types and ranges when made (a string where a tuple belongs was split into letters)."""
    assert sc.PatchConfig(directions="denoise").directions == ("denoise",)
    assert sc.PatchConfig(directions="both").directions == ("denoise", "noise")
    with pytest.raises(sc.ConfigError, match="directions: choose one of 'denoise', 'noise', got 'd'"):
        sc.PatchConfig(directions=["d"])  # type: ignore[list-item]
    with pytest.raises(sc.ConfigError, match="batch_size: must be >= 1, got 0"):
        sc.PatchConfig(batch_size=0)
    with pytest.raises(sc.ConfigError, match="config: expected a PatchConfig .* got str"):
        sc.patch("a", "b", "data", "granularity=head")  # type: ignore[arg-type]
    with pytest.raises(sc.ConfigError, match="PatchConfig has no field"):
        sc.patch("a", "b", "data", {"granularty": "head"})  # type: ignore[arg-type]
    with pytest.raises(sc.ConfigError, match="method: choose one of full, lora, targeted-lora"):
        sc.FinetuneConfig(method="qlora")
    assert sc.DataConfig("x", n_docs=3).replace(n_docs=5).n_docs == 5


def test_cli_flags_are_generated_from_the_fields() -> None:
    parser = argparse.ArgumentParser()
    add_config(parser, Toy)
    args = parser.parse_args(["--mode", "mean", "--batch-size", "8", "--layers", "1-2", "--no-cka"])
    toy = config_from_args(Toy, args)
    assert toy == Toy(mode="mean", batch_size=8, layers=(1, 2), cka=False)
    assert config_from_args(Toy, parser.parse_args([])) == Toy()  # argparse defaults are the fields' defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-size", "0"])  # the range is checked while parsing, before any work
    assert [flag_of(f) for f in config_fields(Toy)] == ["--mode", "--batch-size", "--rate", "--layers", "--tag",
                                                          "--no-cka"]


@pytest.mark.parametrize("command, config", [("analyze", sc.AnalysisConfig), ("patch", sc.PatchConfig),
                                             ("attribute", sc.AttributionConfig), ("ablate", sc.AblationConfig),
                                             ("finetune", sc.FinetuneConfig), ("evaluate", sc.EvaluationConfig),
                                             ("circuit", sc.CircuitConfig), ("reproduce", sc.StudyConfig)])
def test_every_command_exposes_its_config_with_the_same_defaults(command: str, config: type) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    by_dest = {a.dest: a for a in sub._actions}
    for f in config_fields(config):
        if not f.metadata.get("cli", True):
            continue
        action = by_dest[f.name]  # every CLI field has its flag, under the field's own name
        assert flag_of(f) in action.option_strings or f.name in ("data",), (command, f.name)
        want = f.metadata.get("cli_default", dataclasses.MISSING)
        if want is dataclasses.MISSING:
            want = f.default if f.default is not dataclasses.MISSING else None
        if f.metadata.get("repeat"):
            want = None
        assert action.default == want, (command, f.name, action.default, want)
        assert str(f.metadata["help"]).split("(")[0].strip()[:20].replace("%", "%%") in (action.help or ""), \
            (command, f.name)


def test_library_errors_name_parameters_and_the_cli_shows_flags(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(sc.ConfigError, match=r"^max_tokens: must be >= 16, got 8$"):
        sc.DataConfig("x", max_tokens=8)
    with pytest.raises(SystemExit) as usage:  # a usage error from argparse: the choices are the registry's names
        main(["circuit", "--analysis", str(tmp_path), "--score", "nope", "--out", str(tmp_path / "c.json")])
    assert usage.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["reproduce", "--model", "m", "--data", str(tmp_path), "--set", "eval_docs=0",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--set: eval_docs: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["reproduce", "--model", "m", "--data", str(tmp_path), "--seeds", "1,1",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--seeds: must be distinct, got [1, 1]" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    (tmp_path / "folder").mkdir()
    with pytest.raises(sc.SumcircuitError, match="name the split with `split`"):  # the library names the parameter
        sc.load_examples(sc.DataConfig(str(tmp_path / "folder")))
    assert main(["data", str(tmp_path / "folder")]) == 2
    assert "name the split with --split" in capsys.readouterr().err  # the CLI names the flag


def test_registry_names_and_refusals() -> None:
    registry: Registry[int] = Registry("colour")
    registry.register("red", 1)
    with pytest.raises(RegistryError, match="colour 'red' is already registered"):
        registry.register("red", 2)
    registry.register("red", 3, replace=True)
    assert registry.get("red") == 3 and registry.names() == ("red",) and "red" in registry
    with pytest.raises(RegistryError, match="unknown colour 'blue'; registered: red"):
        registry.get("blue")
    assert registry.unregister("red") == 3 and not len(registry)


def test_runtime_is_one_place_for_device_and_dtype() -> None:
    assert sc.Runtime().device == "cpu" and sc.Runtime().dtype == "float32"
    with pytest.raises(sc.ConfigError, match="runtime: expected a Runtime"):
        from sumcircuit.runtime import coerce_runtime

        coerce_runtime("cuda")  # type: ignore[arg-type]
    parser = build_parser()
    for command in ("analyze", "patch", "attribute", "ablate", "finetune", "evaluate"):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        flags = {s for a in sub._actions for s in a.option_strings}
        assert {"--device", "--dtype", "--no-progress", "--out"} <= flags, command

"""The compression recipe (compression/config.py): every `welore compress` flag and every REST
compress param maps to one CompressConfig field; defaults and ranges come from the config alone
(change one and both surfaces follow); to_dict/from_dict and to_options/from_options round
trips; the cross-checks; and `--recipe` reproducing a checkpoint's tensors exactly (tiny model)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import random
import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from welore_core.compression import config
from welore_core.compression.config import (OPTIONS, OPTIONS_BY_PATH, CalibrationConfig, CompressConfig,
                                            ExperimentalConfig)
from welore_core.errors import InvalidArgument

# `welore compress` flags and REST params that are not recipe options: what to compress, where to, and after
CLI_EXTRA = {"model", "recipe", "recover", "recover_data", "out", "merged_out", "overwrite", "device", "json", "help",
             "quiet"}
REST_EXTRA = {"merged", "recover", "recover_data"}


def compress_parser(build_parser) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["compress"]


def cli_config(args: list[str], cli_module=None) -> CompressConfig:
    """The recipe `welore compress m --out o ARGS` would run (parsed in-process)."""
    from welore_core.cli import build_parser
    from welore_core.cli.compress import config_from_args

    parsed = build_parser().parse_args(["compress", "m", "--out", "o", *args])
    return config_from_args(parsed)


def rest_config(params: dict, compress_params=None) -> CompressConfig:
    """The recipe a REST compress job with `params` runs (as worker/runner.py builds it)."""
    if compress_params is None:
        from api.jobs.params import CompressParams as compress_params
    p = compress_params(**params).model_dump()
    return CompressConfig.from_options({k: p[k] for k in OPTIONS})


def leaf_fields(cls=CompressConfig, prefix=()) -> set[tuple[str, ...]]:
    sections = {"calibration": CalibrationConfig, "experimental": ExperimentalConfig}
    out = set()
    for f in dataclasses.fields(cls):
        if f.name in sections:
            out |= leaf_fields(sections[f.name], (f.name,))
        else:
            out.add(prefix + (f.name,))
    return out


# -- one option per field, on both surfaces ----------------------------------------------------

def test_every_config_field_has_exactly_one_option():
    assert set(OPTIONS_BY_PATH) == leaf_fields()
    assert len(OPTIONS_BY_PATH) == len(OPTIONS)  # no two options share a field
    assert all(OPTIONS[name].path == path for path, name in OPTIONS_BY_PATH.items())


def test_every_cli_flag_maps_to_one_config_field():
    from welore_core.cli import build_parser

    actions = {a.dest: a for a in compress_parser(build_parser)._actions}
    assert set(actions) - CLI_EXTRA == set(OPTIONS)
    for o in OPTIONS.values():
        a = actions[o.name]
        assert o.flag in a.option_strings, (o.name, a.option_strings)
        assert a.default is None  # the config's default applies, not one of the parser's own
        if o.choices:
            assert tuple(a.choices) == o.choices
        if o.type is bool:
            assert "--no-" + o.flag[2:] in a.option_strings  # --sequential / --no-sequential


def test_every_rest_param_maps_to_one_config_field():
    from api.jobs.params import CompressParams

    fields = CompressParams.model_fields
    assert set(fields) - REST_EXTRA == set(OPTIONS)
    for o in OPTIONS.values():
        assert fields[o.name].default is None, o.name  # the config's default applies
        assert o.help in fields[o.name].description


def test_both_surfaces_give_the_same_recipe_for_the_same_values():
    values = {"err": 0.35, "method": "uniform", "min_ratio": 0.25, "dtype": "bf16", "calibration": "boolq",
              "calib_samples": 32, "calib_seq_len": 256, "factorization": "whitened", "sequential": True,
              "compensate": True, "damp": 0.05, "sink_weight": 4.0, "rank_multiple": 16}
    assert set(values) | {"params_kept"} == set(OPTIONS)  # every option is exercised
    args = []
    for name, v in values.items():
        flag = OPTIONS[name].flag
        args += [flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)]
    expected = CompressConfig(err=0.35, method="uniform", min_ratio=0.25, dtype="bf16", rank_multiple=16,
                              calibration=CalibrationConfig(
        data="boolq", samples=32, seq_len=256, sequential=True, compensate=True, damp=0.05),
        experimental=ExperimentalConfig(sink_weight=4.0))
    assert cli_config(args) == expected == rest_config(values)
    assert cli_config(["--params-kept", "0.7", "--calibration", "none", "--method", "welore"]) == \
        rest_config({"params_kept": 0.7, "calibration": "none", "method": "welore"}) == \
        CompressConfig(params_kept=0.7, method="welore", calibration=None)
    assert cli_config(["--err", "0.3", "--no-sequential", "--no-compensate"]).calibration == \
        rest_config({"err": 0.3, "sequential": False, "compensate": False}).calibration == \
        CalibrationConfig(sequential=False, compensate=False)


def test_defaults_of_both_surfaces_are_the_configs():
    assert cli_config(["--err", "0.3"]) == rest_config({"err": 0.3}) == CompressConfig(err=0.3)
    d = CompressConfig(err=0.3)
    assert d.calibration == CalibrationConfig() and d.method == "auto"  # calibrated by default
    assert d.resolve().method == "loss" and CompressConfig(err=0.3, calibration=None).resolve().method == "welore"
    light = CompressConfig(err=0.1).resolve().calibration  # below HEAVY_FROM_ERR: one calibration pass
    assert light.sequential is False and light.compensate is False
    for heavy in (d, CompressConfig(err=0.5), CompressConfig(params_kept=0.8)):
        assert heavy.resolve().calibration.sequential and heavy.resolve().calibration.compensate
    assert CompressConfig(params_kept=0.9).resolve().calibration.compensate is False
    # damping and windows "auto": the light values up to HEAVY_CALIBRATION_FROM_ERR (ERR 0.3 and params kept 0.8
    # included), then the heavy ones
    assert d.calibration.damp is None and d.resolve().calibration.damp == config.DAMP
    assert CompressConfig(params_kept=0.8).resolve().calibration.damp == config.DAMP
    for heavy in (CompressConfig(err=config.HEAVY_CALIBRATION_FROM_ERR), CompressConfig(err=0.5), CompressConfig(params_kept=0.6)):
        assert heavy.resolve().calibration.damp == config.HEAVY_DAMP > config.DAMP
        assert heavy.resolve().calibration.samples == config.HEAVY_SAMPLES > config.SAMPLES  # and more windows
    assert d.resolve().calibration.samples == CompressConfig(params_kept=0.8).resolve().calibration.samples == config.SAMPLES
    given = CompressConfig(err=0.5, calibration=CalibrationConfig(damp=0.05, samples=32))
    assert (given.resolve().calibration.damp, given.resolve().calibration.samples) == (0.05, 32)  # given values are kept


# -- defaults and ranges live in one place: change one, both surfaces follow --------------------

@pytest.fixture
def patched_config(monkeypatch):
    """config.py executed with source edits, installed as welore_core.compression.config; then the
    CLI's compress module and the REST params are imported afresh from it (monkeypatch puts the
    original modules back afterwards)."""
    names = ("welore_core.cli.compress", "welore_core.cli", "api.jobs.params")

    def install(edits: list[tuple[str, str]]):
        for name in names:  # imported first, so that they are restored rather than dropped
            importlib.import_module(name)
        path = Path(config.__file__)
        src = path.read_text()
        for old, new in edits:
            assert src.count(old) == 1, old
            src = src.replace(old, new)
        mod = types.ModuleType(config.__name__)
        mod.__file__, mod.__package__ = str(path), config.__package__
        monkeypatch.setitem(sys.modules, config.__name__, mod)
        exec(compile(src, str(path), "exec"), mod.__dict__)
        for name in names:  # sys.modules and the parent packages' attributes get the originals back
            parent, child = name.rsplit(".", 1)
            monkeypatch.setattr(sys.modules[parent], child, sys.modules[name])
            monkeypatch.delitem(sys.modules, name)
        cli = importlib.import_module("welore_core.cli")
        params = importlib.import_module("api.jobs.params")
        return mod, cli, params
    return install


def test_a_changed_range_reaches_the_cli_and_the_rest_schema(patched_config, capsys):
    mod, cli, params = patched_config([("lo=1, hi=100_000))", "lo=1, hi=1000))")])  # calib_samples
    assert mod.OPTIONS["calib_samples"].hi == 1000
    parser = cli.build_parser()
    ok = parser.parse_args(["compress", "m", "--out", "o", "--err", "0.3", "--calib-samples", "1000"])
    assert cli.compress.config_from_args(ok).calibration.samples == 1000
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "m", "--out", "o", "--err", "0.3", "--calib-samples", "1001"])
    assert "expected a value in [1, 1000], got 1001" in capsys.readouterr().err
    assert params.CompressParams(err=0.3, calib_samples=1000).calib_samples == 1000
    with pytest.raises(ValidationError, match="less than or equal to 1000"):
        params.CompressParams(err=0.3, calib_samples=1001)
    with pytest.raises(InvalidArgument, match=r"calib_samples must be in \[1, 1000\]"):
        mod.CompressConfig(err=0.3, calibration=mod.CalibrationConfig(samples=1001))


def test_a_changed_default_reaches_the_cli_and_the_rest_params(patched_config):
    mod, cli, params = patched_config([("min_ratio: float = field(default=0.5,", "min_ratio: float = field(default=0.25,"),
                                       ("SEQ_LEN = 512  #", "SEQ_LEN = 384  #")])
    args = cli.build_parser().parse_args(["compress", "m", "--out", "o", "--err", "0.3"])
    from_cli = cli.compress.config_from_args(args)
    p = params.CompressParams(err=0.3).model_dump()
    from_rest = mod.CompressConfig.from_options({k: p[k] for k in mod.OPTIONS})
    assert from_cli == from_rest
    assert (from_cli.min_ratio, from_cli.calibration.seq_len) == (0.25, 384)
    help_text = {a.dest: a.help for a in compress_parser(cli.build_parser)._actions}
    assert "(default 0.25)" in help_text["min_ratio"] and "(default 384)" in help_text["calib_seq_len"]
    assert "(default 0.25)" in params.CompressParams.model_fields["min_ratio"].description


# -- serialisation round trips -----------------------------------------------------------------

RECIPES = [
    CompressConfig(err=0.3),
    CompressConfig(err=0.3).resolve(),
    CompressConfig(params_kept=0.6, calibration=None),
    CompressConfig(params_kept=0.6, method="uniform", min_ratio=0.0, dtype="fp16", calibration=None),
    CompressConfig(err=0.5, method="welore", calibration=CalibrationConfig(data="boolq", samples=8, seq_len=128,
                                                                             sequential=False, damp=0.1),
                   experimental=ExperimentalConfig(sink_weight=16.0)),
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_to_dict_from_dict_round_trip_through_json(recipe):
    d = recipe.to_dict()
    assert d["version"] == config.RECIPE_VERSION
    assert CompressConfig.from_dict(json.loads(json.dumps(d))) == recipe
    assert CompressConfig.from_dict({k: v for k, v in d.items() if k != "version"}) == recipe


@pytest.mark.parametrize("recipe", RECIPES)
def test_to_options_from_options_round_trip(recipe):
    opts = recipe.to_options()
    assert set(opts) == set(OPTIONS)
    assert CompressConfig.from_options(opts) == recipe
    assert (opts["calibration"] == "none") == (recipe.calibration is None)


def test_a_version_1_recipe_reads_back_unrounded():
    d = CompressConfig(err=0.3).to_dict()
    assert d["version"] == 2 and d["rank_multiple"] == config.RANK_MULTIPLE
    old = {k: v for k, v in d.items() if k != "rank_multiple"}
    assert CompressConfig.from_dict({**old, "version": 1}).rank_multiple == 1  # it was written before rounding
    assert CompressConfig.from_dict({**d, "version": 1, "rank_multiple": 8}).rank_multiple == 8
    with pytest.raises(InvalidArgument, match="rank_multiple must be in"):
        CompressConfig(err=0.3, rank_multiple=0)
    assert cli_config(["--err", "0.3", "--rank-multiple", "16"]) == rest_config({"err": 0.3, "rank_multiple": 16}) \
        == CompressConfig(err=0.3, rank_multiple=16)


def test_from_dict_refuses_what_it_does_not_know():
    d = CompressConfig(err=0.3).to_dict()
    with pytest.raises(InvalidArgument, match="unknown key.*rank_from.*expected some of"):
        CompressConfig.from_dict({**d, "rank_from": "activations"})
    with pytest.raises(InvalidArgument, match=r"recipe\.calibration: unknown key.*alpha"):
        CompressConfig.from_dict({**d, "calibration": {**d["calibration"], "alpha": 0.5}})
    with pytest.raises(InvalidArgument, match="version 99 is not supported"):
        CompressConfig.from_dict({**d, "version": 99})
    with pytest.raises(InvalidArgument, match="must be a JSON object"):
        CompressConfig.from_dict([0.3])
    with pytest.raises(InvalidArgument, match="unknown compression option.*alpha"):
        CompressConfig.from_options({"err": 0.3, "alpha": 0.5})


# -- cross-checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: CompressConfig(err=0.3, calibration=CalibrationConfig(sequential=False, compensate=True)),
     "compensate fits o_proj/down_proj inside the sequential pass; enable sequential"),
    (lambda: CompressConfig(err=0.3, method="loss", calibration=None), "method loss .* needs calibration; choose"),
    (lambda: CompressConfig(err=0.3, calibration=None, experimental=ExperimentalConfig(sink_weight=8.0)),
     "sink_weight weighs calibration tokens and needs calibration text"),
    (lambda: CompressConfig(err=0.3, params_kept=0.6), "give exactly one target: err .* or params_kept"),
    (lambda: CompressConfig(), "give exactly one target"),
    (lambda: CompressConfig(err=1.0), r"err must be in \(0, 1\); received 1.0"),
    (lambda: CompressConfig(err=0.3, method="magic"), "method must be one of auto, loss, welore, uniform"),
    (lambda: CompressConfig.from_options({"err": 0.3, "calibration": "none", "calib_samples": 8}),
     "calib_samples need calibration; drop them or choose calibration text"),
    (lambda: CompressConfig(err=0.3, calibration=CalibrationConfig(data="none")), "pass calibration=None"),
])
def test_cross_checks_refuse_with_a_helpful_message(make, message):
    with pytest.raises(InvalidArgument, match=message):
        make()


def test_cli_cross_checks_are_the_configs():
    with pytest.raises(InvalidArgument, match="enable sequential"):
        cli_config(["--err", "0.3", "--no-sequential", "--compensate"])
    with pytest.raises(InvalidArgument, match="needs calibration"):
        cli_config(["--err", "0.3", "--calibration", "none", "--method", "loss"])
    with pytest.raises(InvalidArgument, match="give a target"):
        cli_config([])


@pytest.mark.parametrize("params, message", [
    ({"err": 0.3, "calibration": "none", "method": "loss"}, "needs calibration"),
    ({"err": 0.3, "sequential": False, "compensate": True}, "enable sequential"),
    ({"err": 0.3, "calibration": "none", "sink_weight": 8}, "sink_weight weighs calibration tokens"),
    ({"err": 0.3, "calibration": "none", "damp": 0.1}, "damp need calibration"),
    ({"err": 0.3, "params_kept": 0.6}, "exactly one of 'err'"),
    ({"method": "welore"}, "exactly one of 'err'"),
])
def test_rest_params_refuse_bad_combinations(params, message):
    """The pydantic model the API validates with (a 422: tests/service/test_api_pg.py)."""
    from api.jobs.params import CompressParams

    with pytest.raises(ValidationError, match=message):
        CompressParams(**params)


# -- --recipe reproduces a checkpoint exactly -----------------------------------------------------

WORDS = "the a cat dog bird sat ran flew on under over mat rug tree and then slowly".split()


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    from tiny_llama import make_tiny_llama, train_tokenizer

    rnd = random.Random(0)
    docs = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(30, 60))) + "." for _ in range(80)]
    root = tmp_path_factory.mktemp("recipe")
    model_dir = root / "dense"
    make_tiny_llama(seed=31, vocab=320).save_pretrained(model_dir)
    train_tokenizer(docs).save_pretrained(model_dir)
    text = root / "calib.txt"
    text.write_text("\n\n".join(docs) + "\n")
    return model_dir, text


def _welore(argv: list[str], cache: Path, monkeypatch) -> None:
    """`welore ARGV` in this process, with its own (cold) spectrum cache."""
    from welore_core.cli import main
    from welore_core.settings import reset

    monkeypatch.setenv("WELORE_CACHE_DIR", str(cache))
    reset()
    try:
        assert main(argv) == 0
    finally:
        monkeypatch.undo()
        reset()


def _tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("flags", [
    ["--calibration", "none", "--min-ratio", "0"],
    ["--calibration", "CALIB", "--calib-samples", "4", "--calib-seq-len", "64", "--min-ratio", "0"],
], ids=["data-free", "calibrated"])
def test_recipe_reproduces_identical_tensors(tiny_with_tokenizer, tmp_path, monkeypatch, flags):
    import torch

    model_dir, text = tiny_with_tokenizer
    flags = [str(text) if f == "CALIB" else f for f in flags]
    first = tmp_path / "first"
    _welore(["compress", str(model_dir), "--err", "0.3", *flags, "--out", str(first), "--json"],
            tmp_path / "cache1", monkeypatch)
    meta = json.loads((first / "welore.json").read_text())
    recipe = CompressConfig.from_dict(meta["recipe"])
    assert recipe.method != "auto" and recipe == recipe.resolve()  # stored resolved (dtype auto: the source's)
    assert (recipe.calibration is None) == ("none" in flags)
    if recipe.calibration is not None:
        assert recipe.method == "loss" and recipe.calibration.data == str(text)
        assert meta["calibration"]["samples"] == 4 and meta["calibration"]["seq_len"] == 64
    assert meta["quality"]["tokens"] > 0 and meta["quality"]["ratio"] > 0

    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe.to_dict()))
    expected = _tensors(first)
    for i, source in enumerate((first / "welore.json", recipe_file)):
        again = tmp_path / f"again{i}"
        _welore(["compress", str(model_dir), "--recipe", str(source), "--out", str(again), "--json"],
                tmp_path / f"cache{i + 2}", monkeypatch)
        got = _tensors(again)
        assert sorted(got) == sorted(expected)
        for name, t in expected.items():
            assert torch.equal(got[name], t), name
        assert json.loads((again / "welore.json").read_text())["recipe"] == meta["recipe"]


def test_recipe_flags_override_the_file(tmp_path):
    recipe = CompressConfig(err=0.3, method="loss", calibration=CalibrationConfig(data="boolq", samples=8)).resolve()
    f = tmp_path / "r.json"
    f.write_text(json.dumps(recipe.to_dict()))
    assert cli_config(["--recipe", str(f)]) == recipe
    assert cli_config(["--recipe", str(f), "--damp", "0.2"]).calibration.damp == 0.2
    data_free = cli_config(["--recipe", str(f), "--calibration", "none", "--method", "welore"])
    assert data_free.calibration is None and data_free.err == 0.3
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="cannot read the recipe"):
        cli_config(["--recipe", str(tmp_path / "bad.json")])
    (tmp_path / "old.json").write_text(json.dumps({"format_version": 1, "method": "welore"}))
    with pytest.raises(InvalidArgument, match="records no recipe"):
        cli_config(["--recipe", str(tmp_path / "old.json")])

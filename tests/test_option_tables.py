"""One option table per job type (welore_core/options.py): for compress, finetune and evaluate, every
option of the config's table has a `welore` flag, a REST field and a console form field, each with the
table's default and range; a REST request the config refuses is a 422 naming the field; the worker runs
the config the API validated. No servers, no models: the app is built without its lifespan."""

from __future__ import annotations

import math

import pytest

from welore_core import evaluate_config
from welore_core.compression import config as compress_config
from welore_core.errors import InvalidArgument
from welore_core.finetune import config as finetune_config
from welore_core.options import range_text

# job type → (option table, config builder, `welore` sub-command, a minimal valid params body)
JOBS = {
    "compress": (compress_config.OPTIONS, compress_config.CompressConfig.from_options, "compress", {"err": 0.3}),
    "finetune": (finetune_config.OPTIONS, finetune_config.FinetuneConfig.from_options, "finetune", {"data": "boolq"}),
    "evaluate": (evaluate_config.OPTIONS, evaluate_config.EvaluateConfig.from_options, "eval", {"data": "boolq"}),
}
SCHEMA = {"compress": "CompressJobCreate", "finetune": "FinetuneJobCreate", "evaluate": "EvaluateJobCreate"}


def _no_default(value) -> bool:
    return value is None or value == ""  # "" (finetune teacher): none, and REST leaves it out


def _probes(o):
    """(value, in range?) at both ends of a numeric option: each bound and the nearest value beyond it."""
    out = []
    for bound, open_, away in ((o.lo, o.lo_open, -math.inf), (o.hi, o.hi_open, math.inf)):
        beyond = bound + (1 if away > 0 else -1) if o.type is int else math.nextafter(float(bound), away)
        out += [(o.type(bound), not open_), (beyond, False)]
    return out


def _body(job: str, name: str, value) -> dict:
    params = dict(JOBS[job][3])
    if JOBS[job][0][name].target:
        params.pop("err")
    return {"type": job, "model": "tiny", "params": {**params, name: value}}


# -- the app, without its lifespan (no database, broker or store) ---------------------------------------
@pytest.fixture(scope="module")
def app():
    from api.app import create_app
    from api.settings import Settings

    return create_app(Settings())


@pytest.fixture(scope="module")
def spec(app):
    return app.openapi()


@pytest.fixture(scope="module")
def http(app):
    """POST /v1/jobs as far as its validation: the key and the service's dependencies are stubbed."""
    from fastapi.testclient import TestClient

    from api import deps

    for dep in (deps.current_key, deps.get_db, deps.get_bus, deps.get_dispatcher, deps.get_settings):
        app.dependency_overrides[dep] = lambda: None
    try:
        yield TestClient(app, raise_server_exceptions=False)
    finally:
        app.dependency_overrides.clear()


@pytest.fixture(scope="module")
def parser():
    from welore_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


# -- the console's reading of the schema (api/console/static/submit.js: resolve, describe, fields) -------
def _resolve(spec, schema):
    while schema and "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].split("/")[-1]]
    return schema or {}


def _describe(spec, prop):
    p = _resolve(spec, prop)
    variants = [_resolve(spec, v) for v in p.get("anyOf", [p])]
    real = [v for v in variants if v.get("type") != "null"]
    v = real[0] if real else {}
    default = p["default"] if p.get("default") is not None else v.get("default")  # JS: p.default ?? v.default
    enum = v.get("enum") or ([v["const"]] if "const" in v else None)  # JS: v.enum ?? [v.const]
    return {"type": v.get("type") or ("object" if "properties" in v else "string"), "enum": enum,
            "default": default,
            "min": v.get("minimum", v.get("exclusiveMinimum")), "max": v.get("maximum", v.get("exclusiveMaximum")),
            "exMin": "exclusiveMinimum" in v, "exMax": "exclusiveMaximum" in v}


def _console_fields(spec, job: str) -> dict:
    params = _resolve(spec, spec["components"]["schemas"][SCHEMA[job]]["properties"]["params"])
    return {k: _describe(spec, prop) for k, prop in params["properties"].items()}


JSON_TYPE = {int: "integer", float: "number", bool: "boolean", str: "string"}


# -- the derivation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", JOBS)
def test_every_option_has_a_flag_a_rest_field_and_a_console_field_with_its_default_and_range(job, spec, parser):
    import argparse

    from api.jobs.params import PARAMS

    table, _, command, _ = JOBS[job]
    flags = {s: a for a in parser[command]._actions for s in a.option_strings}
    rest = PARAMS[job].model_fields
    console = _console_fields(spec, job)
    assert table, job
    for o in table.values():
        # the CLI flag: its name, choices, range (the argparse type) and default (in its help; None in args,
        # so the config's own default applies)
        action = flags[o.flag]
        assert action.dest == o.name and action.default is None, o.name
        if not _no_default(o.default):
            shown = str(o.default).lower() if o.type is bool else str(o.default)
            assert f"(default {shown})" in action.help, (o.name, action.help)
        if o.numeric:
            assert action.help.endswith(f"range {range_text(o)}"), (o.name, action.help)
        if o.type is bool:
            assert isinstance(action, argparse.BooleanOptionalAction), o.name
        elif o.choices:
            assert tuple(action.choices) == o.choices, o.name
        elif o.numeric:
            assert o.lo is not None and o.hi is not None, f"{o.name}: every number has both bounds"
            for value, ok in _probes(o):
                if ok:
                    assert action.type(repr(value)) == value, (o.name, value)
                else:
                    with pytest.raises(argparse.ArgumentTypeError):
                        action.type(repr(value))

        # the REST field: it exists, and left out it is None (the config's default applies)
        assert o.name in rest and rest[o.name].default is None, o.name

        # the console field, read from the OpenAPI schema as submit.js reads it
        d = console[o.name]
        assert d["type"] == JSON_TYPE[o.type], o.name
        assert d["default"] == o.default or (_no_default(d["default"]) and _no_default(o.default)), o.name
        if o.choices:
            assert tuple(d["enum"]) == o.choices, o.name
        if o.numeric:
            assert (d["min"], d["exMin"], d["max"], d["exMax"]) == (o.lo, o.lo_open, o.hi, o.hi_open), o.name
    # nothing in the REST params or the form that the table does not hold, but the job's inputs
    extra = {"compress": {"merged", "recover", "recover_data"}, "finetune": {"data", "merged"}, "evaluate": {"data"}}
    assert set(rest) == set(table) | extra[job] == set(console)


@pytest.mark.parametrize("job", JOBS)
def test_rest_refuses_with_a_422_exactly_what_the_config_refuses(job, http):
    from api.jobs.params import PARAMS

    table, build, _, base = JOBS[job]
    for o in table.values():
        if not o.numeric:
            continue
        for value, ok in _probes(o):
            options = {**({} if o.target else {k: v for k, v in base.items() if k in table}), o.name: value}
            if ok:
                build(options)  # the config takes it, and so does the REST model
                PARAMS[job].model_validate(_body(job, o.name, value)["params"])
                continue
            with pytest.raises(InvalidArgument, match=o.name):
                build(options)
            r = http.post("/v1/jobs", json=_body(job, o.name, value))
            assert r.status_code == 422, (o.name, value, r.text)
            field = next(f for f in r.json()["error"]["fields"] if f["field"] == f"params.{o.name}")
            assert field["allowed"] and field["received"] == value, field


@pytest.mark.parametrize("job,params,names", [
    ("finetune", {"precision": "fp32", "frozen_dtype": "bf16"}, "frozen_dtype"),  # a cross-check of FinetuneConfig
    ("compress", {"calibration": "none", "method": "loss"}, "method loss"),
    ("compress", {"calibration": "none", "calib_samples": 8}, "calib_samples"),
])
def test_a_combination_the_config_refuses_is_a_422_with_its_message(job, params, names, http):
    table, build, _, base = JOBS[job]
    options = {**{k: v for k, v in base.items() if k in table}, **params}
    with pytest.raises(InvalidArgument) as refused:
        build(options)
    r = http.post("/v1/jobs", json={"type": job, "model": "tiny", "params": {**base, **params}})
    assert r.status_code == 422, r.text
    assert refused.value.message in r.json()["error"]["message"] and names in r.json()["error"]["message"]


def test_the_worker_runs_the_config_the_api_validated(monkeypatch, tmp_path):
    """The REST model's params, as stored (None left out), give the worker the same config; a param its table
    lacks is refused, not dropped."""
    import welore_core.finetune
    import welore_core.pipelines
    from api.jobs.params import FinetuneParams
    from api.settings import Settings
    from worker.runner import HANDLERS, JobSpec

    seen = {}
    monkeypatch.setattr(welore_core.finetune, "finetune_checkpoint", lambda model, out, **kw: seen.update(kw) or {},
                        raising=False)
    monkeypatch.setattr(welore_core.pipelines, "evaluate_model", lambda model, data, **kw: seen.update(kw) or {})
    given = FinetuneParams.model_validate({"data": "boolq", "steps": 7, "val_fraction": 0.2})
    params = {k: v for k, v in given.model_dump(mode="json").items() if v is not None}
    HANDLERS["finetune"](JobSpec("job_x", "finetune", params, {"kind": "registry", "name": "tiny"}, 1), tmp_path, None, None, Settings())
    expected = finetune_config.FinetuneConfig(steps=7, val_fraction=0.2).to_dict()
    assert {k: seen[k] for k in expected} == expected and seen["data"] == "boolq"

    seen.clear()
    HANDLERS["evaluate"](JobSpec("job_y", "evaluate", {"data": "boolq", "windows": 3}, {"kind": "registry", "name": "tiny"}, 1),
                         tmp_path, None, None, Settings())
    assert (seen["seq_len"], seen["windows"]) == (evaluate_config.SEQ_LEN, 3)

    with pytest.raises(InvalidArgument, match="unknown fine-tuning option"):
        HANDLERS["finetune"](JobSpec("job_z", "finetune", {"data": "boolq", "no_such": 1}, {"kind": "registry", "name": "tiny"}, 1),
                             tmp_path, None, None, Settings())


def test_the_tables_are_torch_free():
    import subprocess
    import sys

    code = ("import sys, welore_core.options, welore_core.evaluate_config, welore_core.finetune.config, "
            "welore_core.compression.config; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr

"""The `welore` command line on a tiny model directory: flags, --json contract, errors."""

import json
import subprocess
import sys

import pytest

from tiny_llama import make_tiny_llama


def welore(*args, check=True, env=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "welore_core.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"welore {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_llama(seed=21).save_pretrained(path)
    return path


def test_compress_json_contract_and_reload(tiny_dir, tmp_path):
    out = tmp_path / "c"
    proc = welore("compress", tiny_dir, "--err", "0.3", "--min-ratio", "0", "--calibration", "none", "--out", out,
                  "--json")
    result = last_json(proc)
    for key in ("tau", "err_requested", "err_achieved", "params_before", "params_after", "n_lrc", "n_nlrc",
                "seconds", "peak_rss_mb"):
        assert key in result, key
    assert result["err_requested"] == 0.3 and abs(result["err_achieved"] - 0.3) <= 0.005
    assert (out / "welore.json").is_file() and (out / "model.safetensors").is_file()
    spec = last_json(welore("spectrum", out, "--json"))  # a compressed checkpoint loads by path
    assert len(spec["matrices"]) == 14
    spec_dense = last_json(welore("spectrum", tiny_dir, "--json"))
    assert spec_dense["decomposed"] == 0  # compress already cached every spectrum
    assert spec_dense["matrices"][0]["singular_values"] == sorted(spec_dense["matrices"][0]["singular_values"], reverse=True)


def test_human_report_lists_every_matrix(tiny_dir, tmp_path):
    proc = welore("compress", tiny_dir, "--err", "0.2", "--min-ratio", "0", "--method", "uniform", "--calibration", "none",
                  "--out", tmp_path / "u")
    assert "0.q_proj" in proc.stdout and "1.down_proj" in proc.stdout and "ERR requested 0.2" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["compress", "nope-model", "--err", "0.3", "--out", "X"], "not found"),
    (["compress", "TINY", "--err", "0.3", "--params-kept", "0.5", "--out", "X"], "not allowed with"),
    (["compress", "TINY", "--err", "1.7", "--out", "X"], "expected a value in (0, 1), got 1.7"),
    (["compress", "TINY", "--err", "0.3", "--out", "X"], "--calibration none"),  # calibrated by default: needs a tokenizer
    (["compress", "TINY", "--out", "X"], "give a target"),
    (["compress", "TINY", "--err", "0.3", "--method", "magic", "--out", "X"], "invalid choice"),
    (["eval", "TINY", "--data", "missing.jsonl"], "data 'missing.jsonl' not found"),
    (["eval", "TINY", "--data", "DATA"], "no tokenizer"),
])
def test_errors_are_one_clear_line(tiny_dir, tmp_path, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    args = [str(tiny_dir) if a == "TINY" else str(data) if a == "DATA" else str(tmp_path / a) if a == "X" else a for a in args]
    proc = welore(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_existing_out_is_refused_without_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "c"
    data_free = ("--min-ratio", "0", "--calibration", "none")
    welore("compress", tiny_dir, "--err", "0.3", *data_free, "--out", out)
    proc = welore("compress", tiny_dir, "--err", "0.3", *data_free, "--out", out, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    welore("compress", tiny_dir, "--err", "0.4", *data_free, "--out", out, "--overwrite")
    assert json.loads((out / "welore.json").read_text())["err_requested"] == 0.4


def test_bad_jsonl_line_is_reported_by_number(tmp_path):
    from welore_core.corpus import read_texts
    from welore_core.errors import InvalidData

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(InvalidData, match=r"bad.jsonl:2"):
        read_texts(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"title": "no text"}\n')
    with pytest.raises(InvalidData, match="'text' or 'passage'"):
        read_texts(wrong)

"""Read the per-matrix report from a job's `welore.json` artifact (no torch): τ, the summary,
and per matrix its layer, type, shape, full and kept rank, kept fraction, LRC/N-LRC label,
storage and, where the checkpoint records it, `spectrum_z` (the normalised singular values)."""

from __future__ import annotations

import json
import re
from typing import Any

from .. import storage
from ..errors import Conflict, NotFound
from ..jobs import repository as repo
from ..models import Job
from ..settings import Settings

LAYER = re.compile(r"(?:^|\.)(\d+)\.")  # "3.q_proj" (welore.json) or "model.layers.3.self_attn.q_proj"
SUMMARY_KEYS = ("kind", "method", "tau", "min_ratio", "err_requested", "err_achieved", "params_kept_requested",
                "params_kept_achieved", "target_params_before", "target_params_after", "params_before",
                "params_after", "n_lrc", "n_nlrc", "factorization", "rank_from")
MATRIX_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matrix_entry(m: dict[str, Any]) -> dict[str, Any]:
    name = str(m.get("name", ""))
    layer = LAYER.search(name)
    rank, kept = int(m.get("rank") or 0), int(m.get("kept_rank") or 0)
    out = {"name": name, "layer": int(layer.group(1)) if layer else None, "matrix": name.rsplit(".", 1)[-1],
           "shape": m.get("shape"), "rank": rank, "kept_rank": kept,
           "kept_fraction": kept / rank if rank else None, "label": m.get("label"), "storage": m.get("storage"),
           "rel_error": m.get("rel_error"), "spectrum_z": m.get("spectrum_z")}
    return out


def build(meta: dict[str, Any]) -> dict[str, Any]:
    matrices = [matrix_entry(m) for m in meta.get("matrices") or []]
    types = sorted({m["matrix"] for m in matrices},
                   key=lambda t: (MATRIX_ORDER.index(t) if t in MATRIX_ORDER else len(MATRIX_ORDER), t))
    layers = sorted({m["layer"] for m in matrices if m["layer"] is not None})
    return {"summary": {k: meta.get(k) for k in SUMMARY_KEYS if k in meta}, "tau": meta.get("tau"),
            "layers": layers, "matrix_types": types, "matrices": matrices}


def report(settings: Settings, session, job: Job) -> dict[str, Any]:
    if job.status != "succeeded":
        raise Conflict(f"job {job.id} is {job.status}; its report exists once it has succeeded",
                       code="job_not_finished")
    if repo.artifact(session, job.id, "welore.json") is None:
        raise NotFound(f"job {job.id} ({job.type}) has no welore.json artifact, so no per-matrix report; "
                       "compress and finetune jobs have one", code="report_not_found")
    path = storage.safe_child(storage.job_dir(settings, job.id), "welore.json")
    if path is None:
        raise NotFound(f"welore.json of job {job.id} is missing from the artifact store", code="artifact_missing")
    return {"job_id": job.id, **build(json.loads(path.read_text()))}

"""Resolve the `model` of a job request without loading anything (and without torch); GET
/v1/models (api/catalog) lists what it accepts.

Order: a registry name; the id of one of the caller's succeeded compress/finetune jobs; a
folder under WELORE_MODELS_DIR (never a path outside it); a model id in the local Hugging
Face cache. The result `{"kind", "name"}` is what the worker turns into a path with its own
settings (see worker/runner.py: `model_path`).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from sqlalchemy.orm import Session

from welore_core.errors import ModelNotFound
from welore_core.registry import REGISTRY, registry_path

from ..errors import Conflict, InvalidRequest, NotFound
from . import repository as jobs_repo
from ..models import ApiKey
from ..settings import Settings

CHECKPOINT_JOBS = ("compress", "finetune")


def _models_dir_path(settings: Settings, spec: str) -> Path | None:
    if settings.models_dir is None:
        return None
    root = Path(settings.models_dir).resolve()
    try:
        candidate = (root / spec).resolve()
        if not candidate.is_relative_to(root) or candidate == root:
            return None
        if candidate.is_dir() and ((candidate / "config.json").is_file() or (candidate / "welore.json").is_file()):
            return candidate
    except (OSError, ValueError):  # a name no folder can have (a part over 255 bytes, ...): not one of ours
        pass
    return None


def _in_hf_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:
        return False


def _looks_like_path_escape(spec: str) -> bool:
    p = PurePosixPath(spec.replace("\\", "/"))
    return spec.startswith(("/", "~")) or ".." in p.parts or ":" in spec


def resolve_model(session: Session, settings: Settings, owner: ApiKey, spec: str) -> dict:
    spec = spec.strip()
    if spec in REGISTRY:
        try:
            registry_path(spec)
        except ModelNotFound as exc:
            raise NotFound(exc.message, code="model_not_found") from exc
        return {"kind": "registry", "name": spec}
    if spec.startswith("job_"):
        job = jobs_repo.get(session, spec, owner.id)
        if job is None:
            raise NotFound(f"job {spec!r} not found", code="model_not_found")
        if job.type not in CHECKPOINT_JOBS:
            raise InvalidRequest(f"job {spec} is a {job.type} job and produced no checkpoint; name a "
                                 "compress or finetune job", code="invalid_model")
        if job.status != "succeeded":
            raise Conflict(f"job {spec} is {job.status}; its checkpoint can be used once it has succeeded",
                           code="model_not_ready")
        return {"kind": "job", "name": spec}
    if _looks_like_path_escape(spec):
        raise NotFound(f"model {spec!r}: paths are not accepted; name a folder under the server's models "
                       "directory (WELORE_MODELS_DIR) instead", code="model_not_found")
    if _models_dir_path(settings, spec) is not None:
        return {"kind": "models_dir", "name": spec}
    if "/" in spec and _in_hf_cache(spec):
        return {"kind": "hf_cache", "name": spec}
    where = ", ".join(sorted(REGISTRY))
    raise NotFound(f"model {spec!r} not found: expected a registry name ({where}), the id of one of your "
                   "succeeded compress/finetune jobs, a folder under the server's models directory"
                   f"{'' if settings.models_dir else ' (none configured: set WELORE_MODELS_DIR)'}"
                   ", or a model id in the local Hugging Face cache (nothing is downloaded); "
                   "GET /v1/models lists them",
                   code="model_not_found")

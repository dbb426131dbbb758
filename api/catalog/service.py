"""What GET /v1/models lists: registry models, models-directory folders and the caller's finished
outputs, i.e. what a job's `model` may name (api/jobs/model_ref.py resolves one)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from sqlalchemy.orm import Session

from welore_core.errors import ModelNotFound
from welore_core.registry import REGISTRY, registry_path

from ..jobs import repository as jobs_repo
from ..models import ApiKey
from ..settings import Settings


def list_models(session: Session, settings: Settings, owner: ApiKey) -> list[dict]:
    out = []
    for name in sorted(REGISTRY):
        try:
            registry_path(name)
            available = True
        except ModelNotFound:
            available = False
        out.append({"id": name, "source": "registry", "available": available})
    if settings.models_dir is not None and Path(settings.models_dir).is_dir():
        root = Path(settings.models_dir).resolve()
        for cfg in sorted(root.glob("**/config.json")):
            rel = cfg.parent.relative_to(root).as_posix()
            if rel != "." and len(PurePosixPath(rel).parts) <= 3:
                out.append({"id": rel, "source": "models_dir", "available": True,
                            "compressed": (cfg.parent / "welore.json").is_file()})
    for job in jobs_repo.finished_outputs(session, owner.id):
        summary = {k: (job.result or {}).get(k) for k in ("method", "err_achieved", "params_kept_achieved",
                                                          "params_after") if (job.result or {}).get(k) is not None}
        out.append({"id": job.id, "source": "job", "available": True, "type": job.type,
                    "base_model": job.model, "created_at": job.created_at.isoformat(), "summary": summary})
    return out

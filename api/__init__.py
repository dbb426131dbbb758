"""The welore job service: a FastAPI application that validates, persists, enqueues and reads
jobs. Nothing here imports torch or transformers; the ML runs in `worker/` through `welore_core`.

Layout (one package per resource): auth/, files/, jobs/, artifacts/, catalog/ (models usable as
inputs), events/ (the progress bus); settings.py, db.py, models.py (tables), errors.py (the one
error hierarchy and its HTTP mapping), deps.py (Annotated dependencies), app.py (the factory).
"""

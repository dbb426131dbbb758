"""GET /v1/jobs/{id}/report: the per-matrix report of a compress (or fine-tune) job's checkpoint."""

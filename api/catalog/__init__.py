"""Models usable as job inputs: resolving a user's model name, and listing them (GET /v1/models)."""

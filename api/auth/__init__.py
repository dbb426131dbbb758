"""API keys: creation (`welore keys create`), hashed storage, and the Bearer dependency."""

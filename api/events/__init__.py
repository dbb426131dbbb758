"""Job events: the bus that carries them live (Redis streams, or in-memory when embedded), their
persistence in the database, and the SSE/JSON endpoints that read them."""

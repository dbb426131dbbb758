"""Alembic migrations of the service database (the only way its schema changes).
Run `welore db upgrade`, or `alembic -c migrations/alembic.ini upgrade head`."""

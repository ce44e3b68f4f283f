"""Alembic migrations of the workbench database (shipped with the package)."""

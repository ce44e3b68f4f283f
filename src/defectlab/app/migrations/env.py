"""Alembic environment: runs on the connection :func:`defectlab.app.db.migrate` passes in."""

from alembic import context

from defectlab.app.db import Base

connection = context.config.attributes.get("connection")
if connection is None:  # the alembic command line: sqlalchemy.url from alembic.ini
    from sqlalchemy import engine_from_config, pool

    engine = engine_from_config(
        context.config.get_section(context.config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()

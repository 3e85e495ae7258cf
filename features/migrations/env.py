"""Alembic environment: uses the connection handed over by `features.migrations.migrate`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from features.migrations import _engine, target_metadata

config = context.config
metadata = target_metadata()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
    else:
        with _engine(config.get_main_option("sqlalchemy.url")).begin() as conn:
            _run(conn)

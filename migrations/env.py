"""Alembic environment of IMMUNE.

The database URL is, in this order: ``config.attributes["url"]`` (set by
:func:`immune.storage.upgrade`), ``alembic -x url=...``, the
``IMMUNE_HIVE__DATABASE`` environment variable, ``sqlalchemy.url`` in
alembic.ini, or ``sqlite:///immune.db``.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import URL

from immune.storage.engine import make_engine, normalize_url
from immune.storage.models import Base

DEFAULT_URL = "sqlite:///immune.db"

config = context.config
target_metadata = Base.metadata

# Only the alembic command line configures logging; a hive or a test that
# migrates programmatically keeps its own.
if config.config_file_name is not None and "url" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> URL:
    return normalize_url(
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("IMMUNE_HIVE__DATABASE")
        or config.get_main_option("sqlalchemy.url")
        or DEFAULT_URL
    )


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url.render_as_string(hide_password=False),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

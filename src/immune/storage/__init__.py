"""The hive's database: models, migrations and the batched write path.

:class:`Store` writes and reads; :func:`upgrade` brings a database to the
latest schema.
"""

from immune.storage.engine import make_engine, normalize_url
from immune.storage.migrate import migrations_dir, upgrade
from immune.storage.store import Store

__all__ = ["Store", "make_engine", "migrations_dir", "normalize_url", "upgrade"]

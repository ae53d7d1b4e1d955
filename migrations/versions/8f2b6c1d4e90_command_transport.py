"""Commands: refused state, error, origin and alert of each command.

Revision ID: 8f2b6c1d4e90
Revises: f0fe44e97b21
Create Date: 2026-12-03 22:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "8f2b6c1d4e90"
down_revision: str | Sequence[str] | None = "f0fe44e97b21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATES = (
    "state IN ('pending', 'sent', 'acknowledged', 'succeeded', 'failed', 'timed_out')"
)
NEW_STATES = (
    "state IN ('pending', 'sent', 'acknowledged', 'succeeded', 'failed', "
    "'timed_out', 'refused')"
)


def upgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.add_column(
            sa.Column(
                "error", sa.Text(), nullable=True, comment="Why it failed or was refused."
            )
        )
        batch.add_column(
            sa.Column(
                "origin",
                sa.String(length=256),
                nullable=True,
                comment="Plugin that issued it.",
            )
        )
        batch.add_column(
            sa.Column(
                "alert_id",
                sa.String(length=128),
                nullable=True,
                comment="Alert it answers.",
            )
        )
        batch.drop_constraint("state", type_="check")
        batch.create_check_constraint("state", NEW_STATES)


def downgrade() -> None:
    op.execute("UPDATE commands SET state = 'failed' WHERE state = 'refused'")
    with op.batch_alter_table("commands") as batch:
        batch.drop_constraint("state", type_="check")
        batch.create_check_constraint("state", OLD_STATES)
        batch.drop_column("alert_id")
        batch.drop_column("origin")
        batch.drop_column("error")

"""source leases: lease holder and expiry per source cursor; one heartbeat row per source runner

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-12 10:00:00.000000
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa
import gateway.store.types


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite cannot drop columns in place (downgrade), and it is a no-op elsewhere.
    with op.batch_alter_table('source_cursors', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=255), nullable=True, comment='hostname:pid:runner-id of the lease holder'))
        batch_op.add_column(sa.Column('lease_until', gateway.store.types.UTCDateTime(), nullable=True, comment='Lease expiry (UTC, gateway clock)'))

    op.create_table('source_runners',
    sa.Column('source_name', sa.String(length=128), nullable=False),
    sa.Column('owner', sa.String(length=255), nullable=False, comment='hostname:pid:runner-id'),
    sa.Column('state', sa.String(length=32), nullable=False, comment='The runner\'s state (standby, idle, polling...)'),
    sa.Column('epoch', sa.BigInteger(), nullable=True, comment='Fencing epoch it holds; null while standby'),
    sa.Column('updated_at', gateway.store.types.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('source_name', 'owner', name=op.f('pk_source_runners'))
    )


def downgrade() -> None:
    op.drop_table('source_runners')
    with op.batch_alter_table('source_cursors', schema=None) as batch_op:
        batch_op.drop_column('lease_until')
        batch_op.drop_column('lease_owner')

"""contract schemas: schema, version and enforced contract per (event type, CloudEvents source)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import gateway.store.types

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Schemas can be large: MariaDB's TEXT holds 64 KB, LONGTEXT 4 GB.
    long_text = sa.Text().with_variant(mysql.LONGTEXT(), 'mysql', 'mariadb')
    op.create_table(
        'contract_schemas',
        sa.Column('event_type', sa.String(length=255), nullable=False),
        sa.Column('source', sa.String(length=255), nullable=False, comment='CloudEvents source attribute (the producer)'),
        sa.Column('source_name', sa.String(length=128), nullable=True, comment='Gateway source that last changed it'),
        sa.Column('mode', sa.String(length=16), nullable=False, comment='evolve | freeze | discard'),
        sa.Column('version', sa.Integer(), nullable=False, comment='1 at creation, +1 per change'),
        sa.Column('schema_json', long_text, nullable=False, comment='Current schema (JSON Schema as JSON)'),
        sa.Column('enforced_json', long_text, nullable=True,
                  comment='freeze/discard: the enforced contract; null in evolve mode'),
        sa.Column('base_fingerprint', sa.String(length=64), nullable=True,
                  comment='SHA-256 of the configured schema, if any'),
        sa.Column('fingerprint', sa.String(length=64), nullable=False, comment='SHA-256 of schema_json (canonical)'),
        sa.Column('updated_at', gateway.store.types.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('event_type', 'source', name=op.f('pk_contract_schemas')),
    )


def downgrade() -> None:
    op.drop_table('contract_schemas')

"""API keys (HMAC digests only), the audit log of admin actions, and store-generated secrets

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gateway.store.types

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# SQLite only auto-increments an INTEGER PRIMARY KEY; BigInteger elsewhere (as schema._SEQ).
_SEQ = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=32), nullable=False, comment='Public key id (part of the token)'),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False, comment='HMAC-SHA256 of the token (hex)'),
        sa.Column('scopes', sa.JSON(), nullable=False, comment='List of scopes'),
        sa.Column('sources', sa.JSON(), nullable=True, comment='Allowed gateway sources; null: all'),
        sa.Column('created_at', gateway.store.types.UTCDateTime(), nullable=False),
        sa.Column('revoked_at', gateway.store.types.UTCDateTime(), nullable=True),
        sa.Column('last_used_at', gateway.store.types.UTCDateTime(), nullable=True,
                  comment='Updated at most once a minute per process'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    )
    op.create_table(
        'audit_log',
        sa.Column('id', _SEQ, autoincrement=True, nullable=False),
        sa.Column('at', gateway.store.types.UTCDateTime(), nullable=False),
        sa.Column('actor_id', sa.String(length=32), nullable=True,
                  comment='API key id; null for the CLI or auth off'),
        sa.Column('actor_name', sa.String(length=255), nullable=False, comment='Key name, or cli:<os user>'),
        sa.Column('action', sa.String(length=64), nullable=False),
        sa.Column('target', sa.String(length=255), nullable=True),
        sa.Column('details', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log')),
    )
    op.create_index(op.f('ix_audit_log_action_id'), 'audit_log', ['action', 'id'], unique=False)
    op.create_table(
        'local_secrets',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('value', sa.String(length=128), nullable=False),
        sa.Column('created_at', gateway.store.types.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_local_secrets')),
    )


def downgrade() -> None:
    op.drop_table('local_secrets')
    op.drop_index(op.f('ix_audit_log_action_id'), table_name='audit_log')
    op.drop_table('audit_log')
    op.drop_table('api_keys')

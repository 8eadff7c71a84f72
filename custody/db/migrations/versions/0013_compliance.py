"""compliance: miners' registry data, evidence documents, reviews, regional mining bans

Issue 15 (A). The bans table is seeded with the government's list as the bank read it
(Decree No. 1869 of 23 December 2024, in force 1 January 2025 to 15 March 2031): all year
in ten regions, and in winter (15 November to 15 March, kept as whole months 11-3, the
safe side) in parts of three. Admins and compliance officers edit it through the API.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 04:10:00
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_TIME = sqlmodel.sql.sqltypes.UTCDateTime
DECREE = "Government Decree No. 1869 of 23.12.2024"
ALL_YEAR = {
    "05": "Dagestan",
    "06": "Ingushetia",
    "07": "Kabardino-Balkaria",
    "09": "Karachay-Cherkessia",
    "15": "North Ossetia-Alania",
    "20": "Chechnya",
    "90": "Zaporozhye",
    "93": "Donetsk",
    "94": "Luhansk",
    "95": "Kherson",
}
WINTER = {"03": "Buryatia (some districts)", "38": "Irkutsk (some districts)", "75": "Zabaykalsky"}


def upgrade() -> None:
    op.create_table(
        "minerrecord",
        sa.Column("id", ID, nullable=False),
        sa.Column("party_id", ID, nullable=False),
        sa.Column("legal_form", sa.String(length=32), nullable=False),
        sa.Column("inn", sa.String(length=12), nullable=False),
        sa.Column("ogrn", sa.String(length=15), nullable=True),
        sa.Column("register_number", sa.String(length=64), nullable=True),
        sa.Column("register_date", sa.Date(), nullable=True),
        sa.Column("register_status", sa.String(length=16), nullable=True),
        sa.Column("region", sa.String(length=2), nullable=False),
        sa.Column("monthly_energy_kwh", sa.BigInteger(), nullable=False),
        sa.Column("data_centre_name", sa.String(length=120), nullable=True),
        sa.Column("data_centre_inn", sa.String(length=12), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(length=160), nullable=False),
        sa.Column("updated_by_id", ID, nullable=True),
        sa.Column("created_at", UTC_TIME(), nullable=False),
        sa.Column("updated_at", UTC_TIME(), nullable=False),
        sa.ForeignKeyConstraint(["party_id"], ["party.id"]),
        sa.ForeignKeyConstraint(["updated_by_id"], ["principal.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("party_id"),
    )
    op.create_table(
        "evidencedocument",
        sa.Column("id", ID, nullable=False),
        sa.Column("party_id", ID, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("content_type", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=200), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("uploaded_by", sa.String(length=160), nullable=False),
        sa.Column("uploaded_by_id", ID, nullable=True),
        sa.Column("uploaded_at", UTC_TIME(), nullable=False),
        sa.ForeignKeyConstraint(["party_id"], ["party.id"]),
        sa.ForeignKeyConstraint(["uploaded_by_id"], ["principal.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("evidencedocument", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evidencedocument_party_id"), ["party_id"])
    op.create_table(
        "compliancereview",
        sa.Column("id", ID, nullable=False),
        sa.Column("party_id", ID, nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("flags", sa.Text(), nullable=False),
        sa.Column("reviewer", sa.String(length=160), nullable=False),
        sa.Column("reviewer_id", ID, nullable=False),
        sa.Column("created_at", UTC_TIME(), nullable=False),
        sa.ForeignKeyConstraint(["party_id"], ["party.id"]),
        sa.ForeignKeyConstraint(["reviewer_id"], ["principal.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("party_id", "digest", "reviewer_id", name="uq_review_once"),
    )
    with op.batch_alter_table("compliancereview", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_compliancereview_party_id"), ["party_id"])
    bans = op.create_table(
        "miningban",
        sa.Column("id", ID, nullable=False),
        sa.Column("region", sa.String(length=2), nullable=False),
        sa.Column("starts_on", sa.Date(), nullable=False),
        sa.Column("ends_on", sa.Date(), nullable=True),
        sa.Column("months", sa.String(length=40), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.Column("created_at", UTC_TIME(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("miningban", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_miningban_region"), ["region"])
    now = datetime.now(UTC)
    start, end = date(2025, 1, 1), date(2031, 3, 15)
    rows = [
        {"region": code, "months": "", "note": f"{name}: all year, {DECREE}"}
        for code, name in ALL_YEAR.items()
    ] + [
        {"region": code, "months": "1,2,3,11,12", "note": f"{name}: 15 Nov-15 Mar, {DECREE}"}
        for code, name in WINTER.items()
    ]
    op.bulk_insert(
        bans,
        [
            {
                **row,
                "starts_on": start,
                "ends_on": end,
                "created_by": "migration:0013",
                "created_at": now,
            }
            for row in rows
        ],
    )


def downgrade() -> None:
    op.drop_table("miningban")
    op.drop_table("compliancereview")
    op.drop_table("evidencedocument")
    op.drop_table("minerrecord")

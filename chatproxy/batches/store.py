"""The `batches` table in the ledger's database: who owns which batch, its upstream ids, status and reservation."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ..budget import Reservation
from ..errors import ApiError
from ..usage import Ledger, create_tables, ledger_table

if TYPE_CHECKING:
    from .service import BatchLine

log = logging.getLogger(__name__)

ID_LENGTH = 38  # "batch_" + 32 hex digits
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
_CUSTOM_ID = re.compile(r"[^\x00-\x1f\x7f]{1,64}")

metadata = sa.MetaData()
batches_table = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(ID_LENGTH), primary_key=True),  # ours, given to the client; never the upstream's
    sa.Column("owner", sa.Text, nullable=False, index=True),  # the identity that submitted it
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("custom_ids", sa.Text, nullable=False),  # JSON list, in submitted order
    sa.Column("status", sa.String(32), nullable=False),  # "submitting", then the upstream's status
    sa.Column("request_counts", sa.Text),  # JSON {"total", "completed", "failed"} as last seen
    sa.Column("upstream_id", sa.Text),
    sa.Column("input_file_id", sa.Text),
    sa.Column("output_file_id", sa.Text),
    sa.Column("error_file_id", sa.Text),
    sa.Column("reserved_day", sa.Date, nullable=False),  # the budget reservation, settled with the results
    sa.Column("reserved_micros", sa.BigInteger, nullable=False),
    sa.Column("reserved_tokens", sa.BigInteger, nullable=False),
    sa.Column("results_recorded", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("reserved_keys", sa.Text),  # JSON list of the counter rows reserved on; NULL: global and owner's
)


class BatchStore:
    """The `batches` table: who owns which batch, its upstream ids and status, its reservation."""

    metadata = metadata

    def __init__(self, ledger: Ledger) -> None:
        self.engine: Engine = ledger.engine
        self.clock = ledger.clock

    def create_schema(self) -> None:
        """Create the table if it is missing."""
        create_tables(self.engine, metadata)

    def insert(self, batch_id: str, owner: str, lines: list[BatchLine], reservation: Reservation) -> None:
        """Remember a batch before it is uploaded; 503 if the database is down."""
        values = {
            "id": batch_id,
            "owner": owner,
            "created_at": self.clock(),
            "model": lines[0].call.model,
            "custom_ids": json.dumps([line.custom_id for line in lines]),
            "status": "submitting",
            "request_counts": json.dumps({"total": len(lines), "completed": 0, "failed": 0}),
            "reserved_day": reservation.day,
            "reserved_micros": reservation.cost_micros,
            "reserved_tokens": reservation.tokens,
            "reserved_keys": json.dumps(list(reservation.keys)),
        }
        with _database("store a new batch"), self.engine.begin() as conn:
            conn.execute(batches_table.insert().values(**values))

    def owned(self, batch_id: str, owner: str) -> dict[str, Any]:
        """The batch if `owner` submitted it; else 404 (not 403: ids cannot be probed)."""
        t = batches_table.c
        row = None
        if BATCH_ID.fullmatch(batch_id):  # anything else cannot exist (and a NUL byte upsets PostgreSQL)
            with _database("read a batch"), self.engine.connect() as conn:
                row = conn.execute(sa.select(batches_table).where(t.id == batch_id, t.owner == owner)).first()
        if row is None:
            raise ApiError(404, "not_found", "There is no batch with this id.")
        return dict(row._mapping)

    def update(self, batch_id: str, **values: Any) -> None:
        """Change some columns of a batch."""
        with _database(f"update batch {batch_id}"), self.engine.begin() as conn:
            conn.execute(batches_table.update().where(batches_table.c.id == batch_id).values(**values))

    def delete(self, batch_id: str) -> None:
        """Forget a batch whose submission failed (best effort: logged, never raised)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(batches_table.delete().where(batches_table.c.id == batch_id))
        except SQLAlchemyError:
            log.exception("cannot delete the failed batch %s", batch_id)

    def record_once(self, batch_id: str, rows: list[dict[str, Any]]) -> bool:
        """Flip `results_recorded` and insert the ledger rows in one transaction; False if already recorded."""
        t = batches_table.c
        claim = (
            batches_table.update().where(t.id == batch_id, t.results_recorded.is_(False)).values(results_recorded=True)
        )
        with _database(f"record the results of batch {batch_id}"), self.engine.begin() as conn:
            if conn.execute(claim).rowcount != 1:  # another fetch got there first (it held the lock until then)
                return False
            if rows:
                conn.execute(ledger_table.insert(), rows)
        return True


@contextmanager
def _database(what: str) -> Iterator[None]:
    """Turn a database failure into 503 ledger_unavailable (logged with what was being done)."""
    try:
        yield
    except SQLAlchemyError:
        log.exception("cannot %s: the ledger's database failed", what)
        raise ApiError(
            503, "ledger_unavailable", "Usage cannot be recorded right now. Try again shortly.", retry_after=5
        ) from None

"""The transactional outbox (contract section 11): publish in the same PostgreSQL
transaction as the state change, and a relay that moves committed rows to RabbitMQ.

``App(outbox=PostgresOutbox(dsn))``, then ``await app.outbox.publish(conn, exchange,
routing_key, payload, key=...)`` inside the caller's transaction; ``rabbitflow run`` runs the
relay beside the consumers, ``rabbitflow outbox relay MODULE:APP`` runs it alone. See
docs/outbox.md.
"""

from rabbitflow.outbox._outbox import PostgresOutbox
from rabbitflow.outbox._schema import PARKED, PENDING, SENT

__all__ = ["PARKED", "PENDING", "SENT", "PostgresOutbox"]

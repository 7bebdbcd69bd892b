"""A job book from a URL, for the command line and the console (``--jobs URL``)."""

from __future__ import annotations

from urllib.parse import urlsplit

from rabbitflow._duration import parse_duration
from rabbitflow.errors import ConfigurationError
from rabbitflow.jobs._book import Book

DEFAULT_TTL = "1d"


def open_book(url: str, *, prefix: str | None = None, ttl: str | int = DEFAULT_TTL) -> Book:
    """The jobs kept at ``url``: ``redis://`` / ``rediss://`` (keys under ``prefix``, by
    default ``rabbitflow:jobs:``) or ``postgresql://`` (the table ``prefix``, by default
    ``rabbitflow_jobs``), as an app with the default store options keeps them."""
    scheme = urlsplit(url).scheme
    ttl_ms = parse_duration(ttl)
    if scheme in ("redis", "rediss", "unix"):
        from rabbitflow.idempotency import RedisStore

        redis_store = RedisStore(url)
        book = redis_store.job_book(ttl_ms, prefix=prefix)
        book.own(redis_store)
        return book
    if scheme in ("postgresql", "postgres"):
        from rabbitflow.idempotency import PostgresStore

        pg_store = PostgresStore(url)
        book = pg_store.job_book(ttl_ms, table=prefix)
        book.own(pg_store)
        return book
    raise ConfigurationError(
        f"--jobs takes a redis:// or postgresql:// URL, not a {scheme or 'schemeless'} one"
    )

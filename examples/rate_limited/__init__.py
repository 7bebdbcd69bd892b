"""A consumer that calls a rate-limited API and honours its ``Retry-After`` with ``Retry``."""

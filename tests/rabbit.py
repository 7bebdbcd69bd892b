"""Old import path of the broker helpers: see ``tests/support/broker.py``."""

from tests.support.broker import LOCAL_URL, Rabbit, answers

__all__ = ["LOCAL_URL", "Rabbit", "answers"]

"""A user module whose own import fails: its traceback is what the user needs to see."""

from __future__ import annotations

from rabbitflow import App
from rabbitflow._payload import no_such_helper  # type: ignore[attr-defined]  # the user's bug

app = App()
print(no_such_helper)

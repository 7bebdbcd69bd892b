"""A user module that imports a package that is not installed."""

from __future__ import annotations

import rabbitflow_test_not_installed  # type: ignore[import-not-found]  # the user's missing dep

from rabbitflow import App

app = App()
print(rabbitflow_test_not_installed)

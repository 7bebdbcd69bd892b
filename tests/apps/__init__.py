"""Small rabbitflow apps that the runtime tests run as ``rabbitflow run tests.apps.MODULE:app``.

Handlers record what they did as lines appended to the file named by ``$RF_RECORD``, so that a
test can count handler runs even across a ``kill -9`` of the worker.
"""

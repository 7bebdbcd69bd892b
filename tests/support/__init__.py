"""Helpers of the project's tests, one noun a module.

* ``broker``: :class:`Rabbit`, the real broker (the shipped plugin's ``RabbitMQ`` plus
  ``rabbitmqctl``), its version, and its view of queues and connections;
* ``amqp``: publish, drain, count, wait for and declare as a producer or an operator would;
* ``worker``: ``running(app, url)``, a worker on the test's event loop;
* ``processes``: ``WorkerProcess``/``Workers`` (``rabbitflow run`` subprocesses, a
  supervisor's ``restart_until``), ``run_cli``;
* ``records``: what handlers did (``Records`` from a file, ``Runs`` in process, ``record``);
* ``topology``: topology files for broker tests;
* ``spans``, ``network``, ``output``: spans; sockets (free, answering, silent), HTTP and
  ``BrokerGate``; metrics and logs;
* ``waiting``: ``wait_until`` (blocking), ``wait_for`` and ``eventually`` (on the event loop).

The fixtures (``rabbit``, ``vhost``, ``vhost_url``, ``caller``, ``workers``) are in
``tests/conftest.py``, built on the plugin's ``rabbitmq_broker``.
"""

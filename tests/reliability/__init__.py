"""Fault injection against a real RabbitMQ: lost, unexpected and duplicated messages counted.

See ``docs/reliability.md`` for what each test does and the figures of a run.
"""

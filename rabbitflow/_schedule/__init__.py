"""Scheduled publishing: ``@app.every`` / ``@app.cron`` ticks, published once per deployment.

:mod:`~rabbitflow.schedule.timing` says when a schedule is due, :mod:`~rabbitflow.schedule.entry`
what one tick publishes, :mod:`~rabbitflow.schedule.lease` which process may publish (a lease
held on RabbitMQ itself), and :mod:`~rabbitflow.schedule.scheduler` runs them in a worker.
"""

from rabbitflow._schedule.entry import Schedule
from rabbitflow._schedule.scheduler import Scheduler, run_schedules
from rabbitflow._schedule.timing import Cron, Every, Timing

__all__ = ["Cron", "Every", "Schedule", "Scheduler", "Timing", "run_schedules"]

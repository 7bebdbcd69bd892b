"""Scheduled publishing (``@app.every``, ``@app.cron``) and the consumer of the ticks."""

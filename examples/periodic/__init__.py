"""A periodic publisher (every N seconds, a report request) and the consumer that builds reports."""

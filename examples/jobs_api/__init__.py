"""Request/response in front, work in the background: a FastAPI endpoint enqueues a job and
returns its id; a rabbitflow consumer runs it and records its status, which the API serves."""

"""Workflows: an extract → transform → load chain, and a chord that makes an album's
thumbnails, then marks the album done with every thumbnail in order.

    rabbitflow run examples.workflows.app:app --workers 2
    python -m examples.workflows.start 42          # an album of 42 images, and an ETL run
"""

from __future__ import annotations

import os

from pydantic import BaseModel, RootModel

from rabbitflow import App
from rabbitflow.idempotency import RedisStore

TOPOLOGY = os.path.join(os.path.dirname(__file__), "topology.toml")


class Extract(BaseModel):
    source: str


class Rows(BaseModel):
    source: str
    rows: list[int]


class Loaded(BaseModel):
    source: str
    total: int


class Image(BaseModel):
    album: int
    id: int


class Thumbnail(BaseModel):
    id: int
    url: str


# The callback takes the members' results as a list, in member order.
Thumbnails = RootModel[list[Thumbnail]]


def make_app(jobs: object) -> App:
    """The app: its four consumers, its workflows' barrier in ``jobs`` (a store of
    rabbitflow.idempotency; a chain alone needs none)."""
    app = App(topology=TOPOLOGY, name="workflows-example", jobs=jobs)

    @app.consumer("etl.extract")
    async def extract(req: Extract) -> Rows:
        # The return value is the next step's input...
        return Rows(source=req.source, rows=[1, 2, 3])

    @app.consumer("etl.transform")
    async def transform(rows: Rows) -> Loaded:
        # ...validated by that step's model: a mismatch dead-letters this step at once.
        return Loaded(source=rows.source, total=sum(rows.rows))

    @app.consumer("etl.load")
    async def load(loaded: Loaded) -> str:
        # The last step's return value is the workflow's result.
        return f"{loaded.source}: {loaded.total}"

    @app.consumer("thumbs.make")
    async def make(image: Image) -> Thumbnail:
        return Thumbnail(id=image.id, url=f"/albums/{image.album}/thumbs/{image.id}.webp")

    @app.consumer("albums.done")
    async def album_done(thumbnails: Thumbnails) -> int:
        return len(thumbnails.root)

    return app


app = make_app(RedisStore(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")))

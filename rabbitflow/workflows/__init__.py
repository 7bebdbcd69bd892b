"""Workflows: chains, groups and chords of steps over RabbitMQ (contract section 14).

```python
from rabbitflow import chain, chord, group, step

flow = await app.start(chain(step("etl.extract", Extract(source=1)), step("etl.transform")))
thumbs = group(step("thumbs.make", Img(id=i)) for i in ids)
flow = await app.start(chord(thumbs, step("albums.done")))
```

A chain needs no store: the rest of the chain travels in each step's message (a routing
slip). Groups and chords keep their barrier in the app's jobs store (``App(jobs=...)``).
See docs/workflows.md for the guarantees and what a workflow costs.
"""

from rabbitflow._continuation import install
from rabbitflow.workflows._canvas import Chain, Chord, Group, Step, chain, chord, group, step
from rabbitflow.workflows._flow import Flow, FlowStatus, StepStatus
from rabbitflow.workflows._steps import WorkflowSteps

install(WorkflowSteps())

__all__ = [
    "Chain",
    "Chord",
    "Flow",
    "FlowStatus",
    "Group",
    "Step",
    "StepStatus",
    "chain",
    "chord",
    "group",
    "step",
]

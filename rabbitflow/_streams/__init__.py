"""Stream consumers that resume where they stopped: the offset of the last handled message is
kept on the broker (:mod:`rabbitflow._streams.offsets`)."""

from rabbitflow._streams.offsets import StreamOffsets, offset_queue

__all__ = ["StreamOffsets", "offset_queue"]

"""The bus client: batched stream publishing and multiplexed stream reading, on any Redis topology.

- `publisher.BatchPublisher`: every XADD of one event-loop tick, across all
  sessions, in one write; survives Redis restarts without losing an entry.
- `reader.StreamMux`: any number of streams through one reader, one round at
  a time; entries that do not belong go to the dead-letter stream.
- `nodes`: where the commands go (one server through a held, hand-packed
  connection; any other client through redis-py; a cluster's masters).
- `entries`: checking entries against their stream, reply shapes, dead letters.
- `wire`: the hand-packed hot-path commands.
"""

from .entries import check_entry, dead_letter, session_of, stream_kind
from .publisher import BatchPublisher
from .reader import Received, StreamMux

__all__ = ["BatchPublisher", "Received", "StreamMux", "check_entry", "dead_letter", "session_of", "stream_kind"]

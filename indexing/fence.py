"""The run's lease, as the embedding actors see it: a shard's output is written only while the run that asked
for it still holds its job's lease.

The driver fences its own writes in memory (``flows.operations.lease.fenced``). The actors run elsewhere (other
processes, other nodes) and can outlive their driver: when a driver is SIGKILLed on a cluster, its actors keep
working until Ray notices, and meanwhile a resumed run may have taken the lease over and committed the same
shard. Before an actor writes a shard's Parquet part and its "written" marker it reads the lease document and
compares the token the driver gave it; a different token means another run owns the job now, and the actor
raises ``LeaseLost`` instead of writing (so it can never put a "written" marker over the new run's "indexed").
One small read per write, on the store the vectors go to.
"""

from __future__ import annotations

from reembed.indexing.records import LeaseFence
from reembed.indexing.storage import StorageOptions, read_json


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it stopped renewing for longer than ``lease.ttl``): it must not commit."""


def check_fence(fence: LeaseFence | None, options: StorageOptions | None) -> None:
    """Raise ``LeaseLost`` unless the lease at ``fence.uri`` still carries ``fence.token``; no fence, no check."""
    if fence is None:
        return
    current = read_json(fence.uri, options) or {}
    if current.get("token") != fence.token:
        holder = current.get("holder", "nobody")
        taken = (f"taken over by {current.get('command', 'another run')} on {holder}" if current else "released")
        raise LeaseLost(f"lease lost to {holder}: the lease of job {fence.job!r} was {taken} while an actor "
                        "embedded a shard for this run; the shard's output is not written")

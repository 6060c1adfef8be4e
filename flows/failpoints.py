"""Failpoints: a testing aid that SIGKILLs a run at a named step of its commit, so tests can prove that a
re-run converges and that the alias never serves an incomplete version, whatever step a crash hits.

Off unless ``REEMBED_FAILPOINTS`` names a step (comma-separated for several), the way FoundationDB and TiKV
test with failpoints: production code pays one environment lookup per step. The kill is SIGKILL of this
process only, as the OOM killer would do it: nothing is flushed or released, no ``finally`` runs, and a local
Ray this process started is left to notice its driver is gone. Never set it outside a test.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

ENV = "REEMBED_FAILPOINTS"

POINTS = {
    "upsert": "a run: after one shard's points are upserted, before its commit marker",
    "after-deletes": "a run: after the reconcile step deleted the points not in the new vector set",
    "after-manifest": "a run: after the manifest is written, before the write-in-progress marker is cleared",
    "after-alias": "a run: after the alias moved, before retention",
    "reindex-swap": "reembed reindex: after the aliases moved to the rebuild, before the old collection is dropped",
}


def failpoint(name: str) -> None:
    """SIGKILL this process here when ``REEMBED_FAILPOINTS`` names ``name``."""
    if name not in POINTS:
        raise ValueError(f"unknown failpoint {name!r}")
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    unknown = names - set(POINTS)
    if unknown:
        logger.error("%s names unknown failpoints %s (known: %s)", ENV, sorted(unknown), ", ".join(POINTS))
    if name in names:
        sys.stderr.write(f"failpoint {name}: SIGKILL of pid {os.getpid()} ({POINTS[name]})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

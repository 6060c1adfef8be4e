"""The shards of big line-scanned corpus files, remembered beside the job's vectors.

Planning a big JSONL or CSV file reads all of it once to find where its records start, so that each worker
can seek to its range. A scheduled re-run of an unchanged corpus would pay that read every time (about a
second per 100 MB), and it grows with the corpus, not with what changed. The shards found are stored here,
one small JSON document per corpus file at ``<output.uri>/_plans/<job>/<hash of the file's URI>.json``, under
a key that includes the file's fingerprint (size plus ETag or modification time: the same evidence commit
markers trust), so a file that changed is scanned again and one that did not is not read at all.

A memo that cannot be read or written costs only that scan: planning never fails because of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

from reembed.indexing.corpus import Shard
from reembed.indexing.storage import StorageOptions, join, read_json, write_json

logger = logging.getLogger(__name__)

KEEP_PLANS = 4  # plans kept per file: the current cut, the smaller one a short plan falls back to, older ones


class StoredShardMemo:
    """``corpus.ShardMemo`` on the job's output storage."""

    def __init__(self, output_uri: str, job: str, options: StorageOptions | None = None) -> None:
        self.root = join(output_uri, "_plans", job)
        self.options = options

    def document(self, uri: str) -> str:
        """Where the plans of the corpus file ``uri`` are kept."""
        return join(self.root, f"{hashlib.sha256(uri.encode()).hexdigest()[:24]}.json")

    def get(self, uri: str, key: str) -> list[Shard] | None:
        plans = self._plans(uri)
        if key not in plans:
            return None
        try:
            return [Shard(**s) for s in plans[key]]
        except TypeError as exc:  # written by another version of reembed: scan again
            logger.info("ignoring a remembered shard plan of %s that does not read back (%s)", uri, exc)
            return None

    def put(self, uri: str, key: str, shards: list[Shard]) -> None:
        plans = self._plans(uri)
        plans.pop(key, None)
        plans[key] = [dataclasses.asdict(s) for s in shards]
        newest = [{"key": k, "shards": v} for k, v in list(plans.items())[-KEEP_PLANS:]]  # a list keeps the order
        try:
            write_json(self.document(uri), {"uri": uri, "plans": newest}, self.options)
        except Exception as exc:  # read-only credentials, a full disk: the next plan scans the file again
            logger.warning("could not remember the shards of %s at %s (%s); the next run scans the file again",
                           uri, self.document(uri), exc)

    def _plans(self, uri: str) -> dict[str, Any]:
        try:
            data = read_json(self.document(uri), self.options) or {}
            return {p["key"]: p["shards"] for p in data.get("plans", [])}
        except Exception as exc:  # damaged or unreadable: treated as empty, replaced by the next put
            logger.info("ignoring the remembered shards of %s (%s)", uri, exc)
            return {}

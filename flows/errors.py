"""Which failures are the user's to fix (one clear message, no retry, no traceback) and which are transient."""

from __future__ import annotations

import logging
from typing import Any

from reembed.flows.config import ConfigError
from reembed.flows.operations.lease import LeaseLost
from reembed.indexing.corpus import CorpusError
from reembed.indexing.index import IndexError_
from reembed.indexing.storage import StorageError
from reembed.workers.model_loader import ModelNotFoundError

JOB_LEVEL_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, CorpusError, StorageError, ModelNotFoundError, IndexError_, PermissionError,
    LeaseLost,  # not the user's to fix, but no retry can help: another run owns the job now
)


def retry_unless_job_level(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retrying cannot fix a missing column or a wrong model name, nor bring
    back a cluster that lost every embedding actor."""
    from reembed.flows.ray_pool import NoActorsLeft, PoolClosed

    return not isinstance(getattr(state, "data", None), (*JOB_LEVEL_ERRORS, NoActorsLeft, PoolClosed))


class _DropTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


def quiet_prefect_tracebacks() -> None:
    """Keep Prefect's failure lines but not their tracebacks: the CLI prints the error itself, in one line.

    The filter sits on the loggers the flow and task engines write to, so it holds whichever handlers Prefect
    attaches later; ``reembed run -v`` leaves it off.
    """
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTracebacks) for f in logger.filters):
            logger.addFilter(_DropTracebacks())

"""The operating side of reembed, apart from the run itself: what keeps unattended runs safe and visible.

``lease`` (one writer per job), ``run_log`` (every run's record, ``reembed history``), ``scheduling``
(Prefect deployments, the work pool's worker, ``serve``). The run (planning, encoding, indexing, commit) lives
in ``reembed.flows`` and calls into these; nothing here encodes or indexes.
"""

"""Orchestration: the job file, shard planning, the Prefect flow that fans shards out to Ray, and the CLI."""

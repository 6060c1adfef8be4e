"""The Prefect flow behind ``reembed run``: plan -> embed -> upsert -> commit.

Tasks pass shard descriptions, URIs and typed records (``reembed.indexing.records``), never tables or
vectors: actors read their shard from storage and write Parquet back; upserts read those parts into Qdrant.
Every commit step is its own Prefect task, so the UI shows (and retries, where a retry is safe) each one. The
manifest (``current.json``) and the alias move come last, so a run that dies midway leaves the previous
state searchable. When the run refreshes the live collection itself, no point reaches it until every shard
is embedded and the quarantine guard has passed, and nothing is deleted until the delete guard has passed
(``reembed.flows.guards``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from reembed.flows.config import JobConfig
from reembed.flows.errors import JOB_LEVEL_ERRORS, retry_unless_job_level
from reembed.flows.failpoints import failpoint
from reembed.flows.gate import GateFailed, check_gate
from reembed.flows.guards import (GuardBlocked, delete_check, empty_check, enforce, first_reasons,
                                  quarantine_check)
from reembed.flows.operations.artifacts import PrefectArtifacts
from reembed.flows.operations.run_log import Trigger, listeners_for, recorded_run, skipped_when_held
from reembed.flows.operations.lease import INDEX_WRITES, STORE_WRITES, JobLease, LeaseLost, fenced, job_lease
from reembed.flows.phases import Phases, timed_phase
from reembed.flows.planning import RunPlan, plan_job, up_to_date_summary
from reembed.flows.progress import ProgressMode, RunProgress, start_board
from reembed.flows.ray_pool import ActorPool, NoActorsLeft, init_ray
from reembed.flows.vector_set import (VectorSet, build_vector_set, full_diff, present, replaced_stale,
                                      rewrite_docs)
from reembed.flows.versions import apply_retention
from reembed.indexing.index import IndexError_, VectorIndex, open_index
from reembed.indexing.records import (GateResult, GuardReport, Manifest, ManifestPart, RunSummary, ShardFailure,
                                      ShardMarker, ShardResult, ShardRow, ShardTask, Status)
from reembed.indexing.upload import upsert_part
from reembed.indexing.storage import StorageUnavailable, unreachable
from reembed.indexing.vector_store import VectorStore

logger = logging.getLogger(__name__)

_RETRY = {"cache_policy": NO_CACHE, "retry_condition_fn": retry_unless_job_level}


class RunFailed(RuntimeError):
    """Some shards failed after their retries; the others completed and are reported."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        by_error: dict[str, list[str]] = {}
        for failure in summary.failures:  # one line however many shards failed the same way
            by_error.setdefault(failure.error or "unknown error", []).append(failure.shard)
        super().__init__(f"{len(summary.failures)} shard(s) failed: " + "; ".join(
            f"{error} ({', '.join(shards[:5])}{f' and {len(shards) - 5} more' if len(shards) > 5 else ''})"
            for error, shards in by_error.items()))


class InvariantBroken(RuntimeError):
    """The counts do not add up: a bug, never a user error; the run is not committed."""


@flow(name="reembed-run", validate_parameters=False)
def run_job(job: JobConfig, force_reason: str | None = None, limit: int | None = None,
            progress: ProgressMode = "log", plan: RunPlan | None = None, check_first: bool = False) -> RunSummary:
    """Embed the job's corpus into Parquet and its Qdrant collection, then point the alias at it.

    ``plan`` is the CLI's (made once, before Prefect starts); without one the flow plans itself. Shards
    whose commit marker matches their input and the model are skipped; documents whose text is unchanged
    reuse their stored vectors; points not in the new vector set are deleted at the end, after the guards.
    ``limit`` embeds only the first N input rows into a trial version that never becomes live.
    ``check_first`` runs the preflight checks inside the recorded run (a deployment's runs, which no CLI
    checked), so a corpus that vanished is a recorded, published failure like any other.
    """
    opts = job.output.storage_options
    trigger, overrides = _origin()
    listeners = [*listeners_for(job), *filter(None, [PrefectArtifacts.of_this_flow_run()])]
    with skipped_when_held(job.output.uri, job.name, trigger, opts, overrides, listeners), \
            job_lease(job.output.uri, job.name, job.lease, "reembed flow", opts) as lease, \
            recorded_run(job.output.uri, job.name, trigger, opts, overrides=overrides, listeners=listeners) as record:
        if check_first:
            from reembed.flows.planning import preflight

            preflight(job)
        try:
            record.summary = _run(job, force_reason, limit, progress, plan, lease)
        except StorageUnavailable:
            raise
        except Exception as exc:
            if unreachable(exc):  # a driver-side read or write outside the steps that name themselves
                raise _store_gone(exc, "a step of the run", None) from None
            raise
        return record.summary


@flow(name="reembed-job", validate_parameters=False)
def run_job_file(job_file: str, overrides: list[str] | None = None) -> RunSummary:
    """The flow a deployment runs (``reembed deploy``): the job file is read where the run happens, so its
    secrets (and those of the worker's environment) never pass through Prefect, and the run goes through the
    same preflight, plan, guards and lease as ``reembed run``, in this one flow run."""
    from reembed.flows.config import load_job

    job = load_job(job_file, list(overrides or []))
    return run_job.fn(job, progress="log", check_first=True)  # checks and plans inside the lease, as the CLI does


def _run(job: JobConfig, force_reason: str | None, limit: int | None, progress: ProgressMode,
         plan: RunPlan | None, lease: JobLease) -> RunSummary:
    clock = Clock()
    plan = plan or plan_task(job, limit)
    _log().info("planned %d shard(s) from %s into %s (%s): %d already indexed, %d written but not indexed, "
                "%d to embed", len(plan.shards), job.corpus.uri, plan.collection, plan.mode, len(plan.indexed),
                len(plan.written), len(plan.todo))
    if plan.mode == "up-to-date":  # before the session: a no-op opens no index shard
        return up_to_date_summary(job, plan, clock.seconds())
    with RunSession(job, plan, lease) as run:
        with Upserts(run) as upserts:
            embedded = embed_shards(run, upserts, progress, clock)  # each shard's points follow it unless held
            results, quarantine = upsert_shards(run, upserts, embedded, force_reason, clock)
        vector_set = vector_set_task(run, results)
        guards = guard_task(run, embedded, results, vector_set, quarantine, force_reason, clock)
        reconciled = reconcile_task(run, vector_set)
        invariant_task(results, vector_set, reconciled)
        lease.check()  # a run that lost its lease (stalled past lease.ttl) commits nothing
        manifest = manifest_task(run, results, vector_set, reconciled, guards)
        if plan.trial:
            return _told(summarize(run, embedded, results, clock, "trial", vector_set, reconciled, guards))
        gate = gate_task(run, manifest, embedded, results, clock, force_reason)
        lease.check()
        alias_task(run)
        retired = retention_task(run)
        return _told(summarize(run, embedded, results, clock, "ok", vector_set, reconciled, guards, gate, retired))


def _told(summary: RunSummary) -> RunSummary:
    """A message the summary carries (a trial's: how to search it) goes to the run's log too."""
    if summary.message:
        _log().info(summary.message)
    return summary


def _progress_listeners(job: JobConfig) -> list[Any]:
    """Who hears of the documents done while shards are embedded: the job's progress push (every
    ``metrics.push_seconds``), when it names a Pushgateway, and the flow run's progress artifact."""
    from reembed.flows.operations.metrics import pusher_for

    pusher, artifacts = pusher_for(job), PrefectArtifacts.of_this_flow_run()
    return [*([pusher.progress] if pusher is not None else []),
            *([artifacts.progress_for(job.name)] if artifacts is not None else [])]


def _origin() -> tuple[Trigger, list[str] | None]:
    """How this flow run started, for the run log: a deployment's schedule, or a deployment run started by hand
    or through the API (with the ``overrides`` it was given), or a plain call (the CLI records its own runs as
    ``cli``, with its ``--set`` pairs)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment, flow_run

    if deployment.id is None:
        return "flow", None
    overrides = [str(o) for o in (flow_run.parameters or {}).get("overrides") or []] or None
    try:
        with get_client(sync_client=True) as client:
            scheduled = client.read_flow_run(flow_run.id).auto_scheduled
        return ("schedule" if scheduled else "deployment"), overrides
    except Exception as exc:  # the record still says it came from a deployment
        _log().warning("could not tell whether this run was scheduled: %s", exc)
        return "deployment", overrides


# --- what the flow carries between steps (in-process only; records cross the boundaries) ---------------------


class Clock:
    """The run's timestamps: start, first encode, last shard embedded."""

    def __init__(self) -> None:
        self.started = self.encode_started = self.embed_done = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


class RunSession:
    """One flow run's live resources: the index client, Ray and the actor pool (started only when shards need
    embedding), the progress board. Closed at the end of the run, whatever happened. With the run's lease, the
    index and the vector store are fenced by it: every write through them checks the lease first."""

    def __init__(self, job: JobConfig, plan: RunPlan, lease: JobLease | None = None) -> None:
        self.job = job
        self.plan = plan
        self.lease = lease
        store = VectorStore(job.output.uri, plan.collection, job.output.storage_options)
        index = open_index(job.index)
        self.store = fenced(store, lease, STORE_WRITES) if lease else store
        self.index = fenced(index, lease, INDEX_WRITES) if lease else index
        self.pool: ActorPool | None = None
        self.owns_ray = False
        # Refreshing the live collection itself: hold every write to it until the quarantine guard has passed.
        self.hold = plan.live == plan.collection
        # Counted before this run writes anything, so the delete guard compares with what users search now.
        self.live_points = self.index.count(plan.live) if plan.live else 0
        # An earlier run wrote to the collection and never committed: its contents are not known from Parquet.
        self.dirty = self.store.writing() is not None
        self.clean_since = self._clean_since()
        self.upserted = 0
        self.phases = Phases()  # the driver's steps; the actors' come with their results
        self._marked = False

    def _clean_since(self) -> str | None:
        """The committed manifest's ``finished_at`` when the collection holds exactly that version, so a shard
        re-embedded against it needs only its changed rows upserted; None when that is not known."""
        manifest, collection = self.plan.manifest, self.plan.collection
        if manifest is None or manifest.finished_at is None or self.dirty or not self.index.exists(collection):
            return None
        points = self.index.count(collection)
        if points != manifest.vector_rows:
            _log().warning("%s holds %d points but its manifest says %d: every re-embedded row is upserted and "
                           "the collection compared in full", collection, points, manifest.vector_rows)
            return None
        return manifest.finished_at

    def mark_writing(self) -> None:
        """Before the first write to the collection: until the manifest is written, a later run must not
        assume the collection equals it."""
        if not self._marked:
            mark_writing_task(self)
            self._marked = True

    def start_actors(self) -> ActorPool:
        self.owns_ray = init_ray(self.job)
        self.pool = ActorPool(self.job, max_actors=len(self.plan.todo))
        if self.pool.dim != self.plan.dim:
            raise IndexError_(f"model makes {self.pool.dim}-dim vectors but its config says {self.plan.dim}")
        return self.pool

    def __enter__(self) -> "RunSession":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(keep=not self.owns_ray)  # a Ray this run started ends with it, and its actors too
        self.index.close()
        if self.owns_ray:
            import ray

            ray.shutdown()


@dataclass
class Embedded:
    """The embed step's outcome: shards embedded by this run, and shards that failed after their retries."""

    fresh: list[ShardResult] = field(default_factory=list)
    failures: list[ShardFailure] = field(default_factory=list)


@dataclass
class Reconciled:
    deleted: int
    points: int
    index_status: str
    extra_quarantine: str | None


# --- plan, embed, upsert -------------------------------------------------------------------------------------


@task(name="mark-writing", retries=2, retry_delay_seconds=[2, 10], **_RETRY)
def mark_writing_task(run: "RunSession") -> None:
    """The collection's "writing" marker, a step like the others: an object store away for a few seconds
    when the first shard is ready is ridden out by the step's retries, not taken for the end of the run."""
    run.store.mark_writing({"collection": run.plan.collection, "started_at": datetime.now(timezone.utc).isoformat()})


@task(name="plan-shards", retries=2, retry_delay_seconds=[2, 10], **_RETRY)
def plan_task(job: JobConfig, limit: int | None) -> RunPlan:
    return plan_job(job, limit)


@task(name="embed-shard", retries=2, retry_delay_seconds=[2, 10], task_run_name="embed-{task.shard.shard_id}",
      **_RETRY)
def embed_task(pool: ActorPool, task: ShardTask, board: Any) -> ShardResult:
    return pool.process_shard(task, board)


@task(name="upsert-shard", retries=3, retry_delay_seconds=[1, 5, 15], task_run_name="upsert-{result.shard_id}",
      **_RETRY)
def upsert_task(run: RunSession, result: ShardResult) -> ShardMarker:
    rows = None
    if result.changed_rows is not None and run.clean_since and result.changed_since == run.clean_since:
        rows = [i for start, end in result.changed_rows for i in range(start, end)]  # the rest is indexed as is
    with run.phases.timed("upsert"):
        points = upsert_part(run.index, run.store, run.plan.collection, result.part_uri, rows) if rows != [] else 0
    failpoint("upsert")
    # The shard's commit marker: written after its Parquet part and its points, so a re-run can skip it.
    marker = ShardMarker(**result.model_dump(exclude={"stage", "points"}), stage="indexed", points=points)
    run.store.write_marker(marker)
    return marker


class Upserts:
    """Upsert tasks on their own runner: one at a time in local mode (not safe for concurrent writers),
    ``index.upsert_parallel`` against a server. When the run refreshes the live collection, results are held
    until ``release`` (after the quarantine guard); otherwise each shard's upsert starts as soon as it is written."""

    def __init__(self, run: RunSession) -> None:
        self.run = run
        run.index.ensure_collection(run.plan.collection, run.plan.dim, run.job.corpus.payload)
        workers = 1 if run.index.serial_writes else run.job.index.upsert_parallel
        self.runner = ThreadPoolTaskRunner(max_workers=workers)
        self.held: list[ShardResult] = []
        self.started: list[tuple[ShardResult, PrefectFuture[ShardMarker]]] = []

    def add(self, result: ShardResult) -> None:
        if self.run.hold:
            self.held.append(result)
        else:
            self.run.mark_writing()
            self.started.append((result, self.runner.submit(upsert_task, {"run": self.run, "result": result})))

    def release(self) -> None:
        held, self.held = self.held, []
        if held:
            self.run.mark_writing()
        self.started += [(r, self.runner.submit(upsert_task, {"run": self.run, "result": r})) for r in held]

    def wait(self) -> tuple[list[ShardMarker], list[ShardFailure]]:
        markers, failures = [], []
        for result, future in self.started:
            try:
                markers.append(future.result())
            except LeaseLost:
                raise  # the run stops: no shard of it may write again
            except Exception as exc:
                if unreachable(exc):
                    raise _store_gone(exc, f"the upsert of shard {result.shard_id}", None) from None
                failures.append(ShardFailure(shard=f"upsert {result.shard_id}", error=f"{type(exc).__name__}: {exc}"))
        return markers, failures

    def __enter__(self) -> "Upserts":
        self.runner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.runner.__exit__(*exc)


def _store_gone(exc: BaseException, what: str, embedded: "Embedded | None") -> StorageUnavailable:
    """One line for a store that stayed away through every retry: which one (an upsert talks to the object
    store and to Qdrant), what failed, and what a re-run reuses."""
    chain, current = [], exc
    while current is not None and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    qdrant = any(type(e).__module__.split(".")[0] in ("qdrant_client", "httpx", "httpcore", "grpc") for e in chain)
    store = "the Qdrant server" if qdrant else "the object store"
    done = f"; the {len(embedded.fresh)} shard(s) this run wrote before are kept" if embedded else ""
    return StorageUnavailable(f"{store} did not answer: {what} failed after its retries "
                              f"({type(exc).__name__}: {exc}){done}. Re-run the job once the store is back: it "
                              "resumes from what was written")


def embed_shards(run: RunSession, upserts: Upserts, progress: ProgressMode, clock: Clock) -> Embedded:
    """Fan the shards to do out to the actors, as many at once as the pool has slots (actors x shards each)."""
    job, plan, log = run.job, run.plan, _log()
    embedded = Embedded()
    for marker in plan.written.values():  # written by an earlier run, not yet upserted
        upserts.add(marker)
    if not plan.todo:
        return embedded
    pool = run.start_actors()
    board = start_board()
    reuse = _reuse_sources(run.store, plan.manifest)
    reuse_since = plan.manifest.finished_at if plan.manifest else None
    tasks = {s.shard_id: ShardTask(
        shard=s, corpus=job.corpus, output_uri=job.output.uri, collection=plan.collection,
        storage_options=job.output.storage_options, model_fingerprint=plan.model_fingerprint,
        input_fingerprint=plan.input_fps[s.shard_id], chunking=job.chunking, reuse_uris=reuse.get(s.uri, []),
        reuse_since=reuse_since,
        progress_seconds=min(1.0, job.runtime.progress_seconds),
        lease=run.lease.for_actors() if run.lease is not None else None) for s in plan.todo}
    clock.encode_started = time.perf_counter()
    with ThreadPoolTaskRunner(max_workers=pool.slots) as runner, \
            RunProgress(plan.todo, progress, job.runtime.progress_seconds, log.info, board,
                        listeners=_progress_listeners(job)) as tracker:
        futures = {runner.submit(embed_task, {"pool": pool, "task": t, "board": board}): sid
                   for sid, t in tasks.items()}
        for future in as_completed(list(futures)):
            shard_id = futures[future]
            try:
                result: ShardResult = future.result()
            except (*JOB_LEVEL_ERRORS, NoActorsLeft):
                raise  # a missing column, on_bad_rows=fail, no actor left: one clear message, not a list of shards
            except Exception as exc:
                if unreachable(exc):  # every other shard would wait out the same retries: stop now
                    pool.close(f"the object store did not answer ({type(exc).__name__})")
                    raise _store_gone(exc, f"shard {shard_id}", embedded) from None
                embedded.failures.append(ShardFailure(shard=shard_id, error=f"{type(exc).__name__}: {exc}"))
                log.error("shard %s failed after retries: %s", shard_id, exc)
                continue
            if run.lease is not None:
                run.lease.fence()  # taken over while embedding: stop now rather than at the first upsert
            tracker.finish_shard(shard_id, result.input_rows)
            embedded.fresh.append(result)
            upserts.add(result)
            log.info("shards %d/%d embedded | %d encoded, %d reused, %d quarantined | shard %s on node %s",
                     len(embedded.fresh) + len(plan.indexed) + len(plan.written), len(plan.shards), result.encoded,
                     result.reused, result.quarantined, shard_id, (result.node or "")[:8])
    clock.embed_done = time.perf_counter()
    return embedded


def upsert_shards(run: RunSession, upserts: Upserts, embedded: Embedded, force_reason: str | None,
                  clock: Clock) -> tuple[list[ShardMarker], GuardReport]:
    """Wait for every shard's points; return every shard's indexed marker in plan order, and the quarantine
    guard's verdict. A live refresh first passes that guard, and a failed one writes nothing to the live
    collection."""
    plan = run.plan
    known = [*plan.indexed.values(), *plan.written.values(), *embedded.fresh]
    report = GuardReport(checks=[quarantine_check(run.job.guards, sum(r.input_rows for r in known),
                                                  sum(r.quarantined for r in known))])
    if run.hold and embedded.failures:  # nothing of a failed refresh reaches the live collection; a re-run resumes
        raise RunFailed(summarize(run, embedded, known, clock, "failed", points=run.index.count(plan.collection)))
    if not embedded.failures and not enforce(report, force_reason):
        quarantines = [r.quarantine_uri for r in known if r.quarantine_uri]
        raise GuardBlocked(report, plan.live, run.store.quarantine_dir if quarantines else None,
                           first_reasons(quarantines, run.job.output.storage_options),
                           summarize(run, embedded, known, clock, "blocked", guards=report))
    upserts.release()
    markers, failures = upserts.wait()
    run.upserted += sum(m.points or 0 for m in markers)
    markers += plan.indexed.values()
    order = {s.shard_id: i for i, s in enumerate(plan.shards)}
    markers.sort(key=lambda m: order[m.shard_id])
    embedded.failures.extend(failures)
    if embedded.failures:
        raise RunFailed(summarize(run, embedded, markers, clock, "failed", points=run.index.count(plan.collection)))
    return markers, report


# --- commit: each step a named task ---------------------------------------------------------------------------


@task(name="vector-set", retries=2, retry_delay_seconds=[2, 10], **_RETRY)
@timed_phase("vector_set")
def vector_set_task(run: RunSession, results: list[ShardMarker]) -> VectorSet:
    """The new vector set from the parts' id columns (never vectors or text), cross-shard duplicates resolved,
    and the collection's points that are not in it: found from the replaced parts alone while the collection
    is known to hold the committed version, by reading all its ids otherwise (``reembed.flows.vector_set``)."""
    plan, index = run.plan, run.index
    vector_set = build_vector_set(run.store, results, run.job.chunking is not None)
    if run.clean_since or (plan.manifest is None and not run.dirty):
        if run.clean_since and plan.manifest is not None:
            vector_set.stale = replaced_stale(run.store, vector_set, plan.manifest)
            rewrite_docs(vector_set, run.store.duplicate_doc_ids(plan.manifest))
        if index.count(plan.collection) - present(index, plan.collection, vector_set.stale) == vector_set.size:
            return vector_set
        _log().warning("%s does not hold what its Parquet parts say: comparing all its ids", plan.collection)
    full_diff(index, plan.collection, vector_set)
    return vector_set


@task(name="check-guards", cache_policy=NO_CACHE)
def guard_task(run: RunSession, embedded: Embedded, results: list[ShardMarker], vector_set: VectorSet,
               quarantine: GuardReport, force_reason: str | None, clock: Clock) -> GuardReport:
    """Stop before any delete or alias move when the new version would remove most of what is live; the report
    carries on from the quarantine guard's, so the manifest records every check."""
    job, plan = run.job, run.plan
    report = GuardReport(checks=list(quarantine.checks), forced=quarantine.forced)
    if not plan.trial:
        if plan.live == plan.collection:
            report.checks.append(delete_check(job.guards, len(vector_set.stale), run.live_points, "points"))
        elif plan.live is not None:  # a new version: the alias move drops live documents it lacks
            live_docs = _live_doc_ids(run.index, plan.live)
            report.checks.append(delete_check(job.guards, vector_set.missing_docs(live_docs), len(live_docs),
                                              "documents"))
    report.checks.append(empty_check(job.guards, vector_set.size, run.live_points))
    if not enforce(report, force_reason):
        raise GuardBlocked(report, plan.live, None, [],
                           summarize(run, embedded, results, clock, "blocked", guards=report))
    return report


@task(name="reconcile", retries=2, retry_delay_seconds=[2, 10], **_RETRY)
@timed_phase("reconcile")
def reconcile_task(run: RunSession, vector_set: VectorSet) -> Reconciled:
    """Make the collection equal the vector set: re-upsert duplicate winners (so the outcome does not depend on
    which shard finished last) and points found missing, delete stale points (vanished documents, leftovers of
    a run that died), then rebuild the index once. Every step is idempotent, so a retry is safe."""
    collection = run.plan.collection
    if vector_set.rewrite or vector_set.stale:
        run.mark_writing()
    for part, rows in vector_set.rewrite.items():
        run.upserted += upsert_part(run.index, run.store, collection, part, sorted(set(rows)))
    run.index.delete_points(collection, vector_set.stale)
    failpoint("after-deletes")
    extra = run.store.write_quarantine("cross-shard-duplicates", vector_set.duplicates)
    status = run.index.finish_bulk_load(collection)
    return Reconciled(deleted=len(vector_set.stale), points=run.index.count(collection), index_status=status,
                      extra_quarantine=extra)


@task(name="check-invariant", cache_policy=NO_CACHE)
def invariant_task(results: list[ShardMarker], vector_set: VectorSet, reconciled: Reconciled) -> None:
    """Every input row is indexed or quarantined, and the collection holds exactly the vector set."""
    input_rows = sum(r.input_rows for r in results)
    indexed = sum(r.rows for r in results)  # cross-shard duplicates sit inside `indexed`
    quarantined = sum(r.quarantined for r in results)
    if input_rows != indexed + quarantined or reconciled.points != vector_set.size:
        raise InvariantBroken(
            f"counts do not add up: input_rows={input_rows} indexed={indexed} quarantined={quarantined} "
            f"duplicates={len(vector_set.duplicates)} points={reconciled.points} vector_rows={vector_set.size}")
    _log().info("invariant holds: %d input rows = %d indexed + %d quarantined + %d duplicates; %d points = %d "
                "vector rows", input_rows, indexed - len(vector_set.duplicates), quarantined,
                len(vector_set.duplicates), reconciled.points, vector_set.size)


@task(name="write-manifest", retries=2, retry_delay_seconds=[2, 10], **_RETRY)
@timed_phase("write_manifest")
def manifest_task(run: RunSession, results: list[ShardMarker], vector_set: VectorSet, reconciled: Reconciled,
                  guards: GuardReport) -> Manifest:
    """The version's commit record, then the removal of files no manifest names any more."""
    job, plan = run.job, run.plan
    extra = reconciled.extra_quarantine
    manifest = Manifest(
        collection=plan.collection, alias=job.name, model=results[0].model if results else job.model.name,
        dim=plan.dim, model_settings=job.model.model_dump(mode="json", exclude={"storage_options"}), fingerprint=plan.model_fingerprint,
        shards=[r.shard_id for r in results],
        parts=[ManifestPart(shard_id=r.shard_id, part_uri=r.part_uri, source=r.source,
                            quarantine_uri=r.quarantine_uri) for r in results],
        extra_quarantine=[extra] if extra else [], vector_rows=vector_set.size,
        input_rows=sum(r.input_rows for r in results), chunked=job.chunking is not None,
        quarantined=sum(r.quarantined for r in results), duplicates=len(vector_set.duplicates), guards=guards,
        forced=guards.forced, trial=plan.trial, finished_at=datetime.now(timezone.utc).isoformat())
    run.store.write_manifest(manifest)
    failpoint("after-manifest")
    run.store.clear_writing()  # the collection equals the manifest again
    removed = run.store.remove_unreferenced(manifest)
    if removed:
        _log().info("removed %d part/quarantine file(s) no longer in the vector set", removed)
    return manifest


@task(name="quality-gate", retries=1, retry_delay_seconds=[5], **_RETRY)
def gate_task(run: RunSession, manifest: Manifest, embedded: Embedded, results: list[ShardMarker], clock: Clock,
              force_reason: str | None) -> GateResult | None:
    """Score the new version against the live one; below the tolerance the alias stays (unless --force)."""
    job, plan = run.job, run.plan
    if job.gate is None or plan.live is None or plan.live == plan.collection:
        return None
    live_manifest = VectorStore(job.output.uri, plan.live, job.output.storage_options).read_manifest()
    gate = check_gate(job, run.index, plan.collection, plan.live, live_manifest)
    forced = force_reason if not gate.passed else None
    run.store.write_manifest(manifest.model_copy(update={"score": gate.new_score, "gate": gate,
                                                         "forced": forced or manifest.forced}))
    _log().info("quality gate: %s new %.4f vs live %s", gate.metric, gate.new_score, gate.live_score)
    if not gate.passed:
        if not force_reason:
            raise GateFailed(gate, summarize(run, embedded, results, clock, "blocked", guards=manifest.guards,
                                             gate=gate))
        _log().warning("quality gate failed but --force was given: %s", force_reason)
    return gate


@task(name="move-alias", retries=2, retry_delay_seconds=[2, 10], **_RETRY)
def alias_task(run: RunSession) -> None:
    run.index.point_alias(run.job.name, run.plan.collection)
    failpoint("after-alias")


@task(name="retention", retries=1, retry_delay_seconds=[5], **_RETRY)
def retention_task(run: RunSession) -> list[str]:
    return apply_retention(run.job, run.index, run.job.index.keep_versions, previous=run.plan.live)


# --- helpers ---------------------------------------------------------------------------------------------------


def summarize(run: RunSession, embedded: Embedded, results: Iterable[ShardResult], clock: Clock, status: Status,
              vector_set: VectorSet | None = None, reconciled: Reconciled | None = None,
              guards: GuardReport | None = None, gate: GateResult | None = None, retired: list[str] | None = None,
              points: int | None = None) -> RunSummary:
    """The run's summary, built once from its records: totals describe the version (every shard), work counts
    (encoded, tokens, truncation, docs/s) describe this run only (the shards it embedded)."""
    job, plan, fresh = run.job, run.plan, embedded.fresh
    results = list(results)
    encoded = sum(r.encoded for r in fresh)
    quarantined = sum(r.quarantined for r in results)
    now = time.perf_counter()
    message = None
    if status == "trial":
        message = (f"trial version {plan.collection} built from the first {plan.limit} input rows; it never "
                   f"becomes live (the alias stays on {plan.live}); search it with "
                   f"`reembed search JOB QUERY --version {plan.collection}`")
    return RunSummary(
        alias=job.name, collection=plan.collection, mode=plan.mode, status=status,
        model=results[0].model if results else job.model.name, dim=plan.dim,
        input_rows=sum(r.input_rows for r in results), indexed=sum(r.rows for r in results), encoded=encoded,
        reused=sum(r.reused for r in fresh), upserted=run.upserted, deleted=reconciled.deleted if reconciled else 0,
        quarantined=quarantined, quarantine=run.store.quarantine_dir if quarantined else None,
        duplicates=len(vector_set.duplicates) if vector_set else 0,
        vector_rows=vector_set.size if vector_set else sum(r.vector_rows for r in results),
        tokens=sum(r.tokens for r in fresh), truncated_docs=sum(r.truncated_docs for r in fresh),
        dropped_tokens=sum(r.dropped_tokens for r in fresh),
        seconds=round(now - clock.started, 3), startup_s=round(clock.encode_started - clock.started, 3),
        docs_per_s=round(encoded / max(now - clock.encode_started, 1e-9), 2) if fresh else None,
        embed_docs_per_s=round(encoded / max(clock.embed_done - clock.encode_started, 1e-9), 2) if fresh else None,
        shards_total=len(plan.shards), shards_done=len(results), shards_skipped=len(plan.indexed),
        shards_embedded=len(fresh), shards_failed=len(embedded.failures), failures=embedded.failures,
        actors=len(run.pool.actors) if run.pool else 0, actors_used=len({(r.node, r.pid) for r in fresh}),
        actors_lost=run.pool.lost if run.pool else 0, actors_replaced=run.pool.replaced if run.pool else 0,
        shards_retried=sorted(run.pool.retried) if run.pool else [],
        shards_by_node=dict(Counter(r.node or "local" for r in fresh)),
        points=reconciled.points if reconciled else points, output=run.store.root,
        index=job.index.where, index_status=reconciled.index_status if reconciled else None,
        guards=guards, gate=gate, retired_versions=retired or [], message=message,
        phases=_phases(run, fresh), shards=shard_rows(plan, embedded),
    )


def _phases(run: RunSession, fresh: list[ShardResult]) -> dict[str, float]:
    """Planning's phases, the actors' (summed over the shards this run embedded) and the driver's steps."""
    actors = {name: round(sum(getattr(r, f"{name}_s") for r in fresh), 4)
              for name in ("read", "reuse", "encode", "write")} if fresh else {}
    if fresh:  # the rest of the actors' time: putting the rows, vectors and payloads together
        actors["assemble"] = round(sum(max(0.0, r.seconds - r.read_s - r.reuse_s - r.encode_s - r.write_s)
                                       for r in fresh), 4)
    return {**run.plan.phases, **actors, **run.phases.as_dict()}


def shard_rows(plan: RunPlan, embedded: Embedded) -> list[ShardRow]:
    """Every planned shard, in plan order, with what this run did to it (the per-shard table of its outcome)."""
    fresh = {r.shard_id: r for r in embedded.fresh}
    failed = {f.shard.removeprefix("upsert "): f.error for f in embedded.failures}
    rows = []
    for shard in plan.shards:
        sid = shard.shard_id
        if sid in fresh:
            row = ShardRow.of(fresh[sid], "embedded")
        elif sid in plan.indexed:
            row = ShardRow.of(plan.indexed[sid], "skipped")
        elif sid in plan.written:
            row = ShardRow.of(plan.written[sid], "upserted")
        else:  # failed before it had a result, or not reached (a run stopped early)
            row = ShardRow(shard=sid, source=shard.uri, outcome="failed", rows=shard.rows_hint)
        if sid in failed:
            row = row.model_copy(update={"outcome": "failed", "error": failed[sid]})
        rows.append(row)
    return rows


def _log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a run (shown in the UI), this module's logger when a step is called alone."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def _reuse_sources(store: VectorStore, previous: Manifest | None) -> dict[str, list[str]]:
    """Committed parts of the previous run, by source file: where unchanged documents' vectors can come from.

    Taken from the manifest, never from markers: a run that was stopped may have rewritten a marker, but the
    parts the manifest names are never overwritten.
    """
    by_source: dict[str, list[str]] = {}
    if previous is None:
        return by_source
    if previous.parts:
        for part in previous.parts:
            by_source.setdefault(part.source, []).append(part.part_uri)
        return by_source
    for shard_id in previous.shards:  # manifests written before parts were listed
        marker = store.read_marker(shard_id)
        if marker:
            by_source.setdefault(marker.source, []).append(store.part_uri(shard_id))
    return by_source


def _live_doc_ids(index: VectorIndex, collection: str) -> set[str]:
    return {str(p.payload.get("doc_id")) for p in index.scroll(collection, ["doc_id"])}


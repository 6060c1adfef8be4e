"""A pool of Ray embedding actors that Prefect tasks borrow one at a time.

Actors ask Ray for one GPU each when the job runs on GPUs, and for ``cpus_per_actor`` CPUs otherwise; they are
spread over the cluster's nodes. Only shard descriptions (URIs) go in and counts come out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reembed.flows.config import JobConfig
from reembed.indexing.records import ActorInfo, ShardResult, ShardTask

logger = logging.getLogger(__name__)


class RayError(RuntimeError):
    """Ray could not be reached, or has no room for the actors the job needs."""


class PoolClosed(RayError):
    """The run is stopping (its object store went away, say): shards not yet started are not started."""


class NoActorsLeft(RayError):
    """Every embedding actor was lost mid-run and no live node has room for a replacement: the run stops (no
    retry can help until the cluster has room again) and a re-run resumes from what was written."""


def _code_modules() -> list[str]:
    """The ``reembed`` package as one folder for Ray's ``py_modules``, so cluster workers import the same code.

    Installed from a wheel, ``reembed`` is a real folder; from a checkout (editable install) its three
    sub-packages live in the repository's top-level folders, so they are copied into a staging folder named
    ``reembed`` first.
    """
    import reembed.flows
    import reembed.indexing
    import reembed.workers

    parts = [Path(m.__file__).parent for m in (reembed.flows, reembed.indexing, reembed.workers)]
    if all(p.parent.name == "reembed" for p in parts) and len({p.parent for p in parts}) == 1:
        return [str(parts[0].parent)]
    stage = Path(tempfile.mkdtemp(prefix="reembed-code-")) / "reembed"
    for part, name in zip(parts, ("flows", "indexing", "workers")):
        shutil.copytree(part, stage / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return [str(stage)]


def init_ray(job: JobConfig) -> bool:
    """Connect to (or start) Ray; returns True when this call started it, so the caller shuts it down."""
    import ray

    if ray.is_initialized():
        return False
    runtime = job.runtime
    ship = runtime.ship_code if runtime.ship_code is not None else runtime.ray_address is not None
    runtime_env: dict[str, Any] = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if ship:
        runtime_env["py_modules"] = _code_modules()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "runtime_env": runtime_env,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    try:
        if runtime.ray_address:
            ray.init(address=runtime.ray_address, **kwargs)
        else:
            ray.init(address="local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayError(f"cannot connect to Ray at {runtime.ray_address or 'a new local instance'}: {exc}") from None
    return True


def gpu_actor_cpus(nodes: list[dict[str, Any]], gpus_per_actor: float) -> int:
    """CPUs for one GPU actor: what the leanest live GPU node has per actor, minus one for Ray and the shard
    threads, between 1 and 16. They become the actor's tokenizer threads: for a MiniLM-sized model one GPU
    encodes faster than a few tokenizer threads feed it (one thread here: ~1,900 SciFact docs/s), so the GPU
    actor takes what its node can spare; the cap leaves room on large nodes for other Ray work."""
    per_actor = [
        node["Resources"].get("CPU", 0) / (node["Resources"]["GPU"] / gpus_per_actor)
        for node in nodes
        if node.get("Alive") and node.get("Resources", {}).get("GPU", 0) > 0
    ]
    return int(max(1, min(16, int(min(per_actor, default=2)) - 1)))


@dataclass
class _Parked:
    """Actors a ``runtime.keep_actors`` run left loaded, and the seat they were started for (Ray job, resources,
    threads, slots); the model they hold can change (``EmbedWorker.load``)."""

    key: tuple
    actors: list[Any]


_parked: _Parked | None = None
_parked_lock = threading.Lock()


def _swap_parked(new: _Parked | None) -> _Parked | None:
    """Put ``new`` in the parking slot and return what was there, atomically (Prefect tasks run in threads)."""
    global _parked
    with _parked_lock:
        old, _parked = _parked, new
    return old


def _model_stamp(job: JobConfig) -> tuple:
    """Each model file's path, size and mtime: parked actors hold the weights they loaded, so a model folder
    rewritten in place (same name, new files) must not find them."""
    from reembed.workers.model_loader import resolve_model_path

    try:
        root = resolve_model_path(job.model.name, job.model.revision, job.model.storage_options)
    except Exception:  # the actors' own start-up reports a model that cannot be found
        return ()
    return tuple(sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                        for f in root.rglob("*") if f.is_file()))


def model_key(job: JobConfig) -> str:
    """What an actor's loaded model must match: the model settings and each model file's path, size and mtime."""
    return hashlib.sha256(repr((job.model.model_dump_json(), _model_stamp(job))).encode()).hexdigest()[:16]


def _take_parked(key: tuple, need: int, exact: bool) -> list[Any] | None:
    """The parked actors when they were started for ``key`` and are ``need`` of them, or at least that many
    unless ``exact`` (``runtime.num_actors`` asked for a number; otherwise a pool with fewer shards than actors
    leaves the rest idle, cheaper than starting any); others are killed first, so they never hold resources a
    new pool needs."""
    parked = _swap_parked(None)
    if parked is None:
        return None
    if parked.key == key and (len(parked.actors) == need if exact else len(parked.actors) >= need):
        return parked.actors
    _kill(parked.actors)
    logger.info("released %d parked embedding actor(s) started for other resources", len(parked.actors))
    return None


def release_parked_actors() -> int:
    """Kill the actors a ``runtime.keep_actors`` run left loaded, freeing their Ray resources (before another
    process's run needs them on the same Ray); returns how many there were."""
    parked = _swap_parked(None)
    if parked is None:
        return 0
    _kill(parked.actors)
    return len(parked.actors)


def _live_nodes() -> str:
    """The live nodes and their free CPUs and GPUs, for messages about actors that found no room."""
    import ray

    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        free = ray.available_resources()
        total = ray.cluster_resources()
    except Exception as exc:  # Ray itself is gone
        return f"unknown ({type(exc).__name__})"
    return (f"{len(alive)}, {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPU and "
            f"{free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPU free")


def _kill(actors: list[Any]) -> None:
    import ray

    if not ray.is_initialized():  # their Ray is gone, and they with it
        return
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception as exc:  # already dead, or from an earlier Ray in this process
            logger.debug("could not kill a parked actor: %s", exc)


class ActorPool:
    """N embedding actors behind a queue: ``process_shard`` borrows an idle actor slot, calls it, gives it back.

    Each actor takes ``runtime.shards_per_actor`` shards at once (default 2 on a GPU, so one shard's reading and
    writing hides behind another's encoding; 1 on a CPU), so ``slots`` = actors x shards per actor.

    Starting an actor costs seconds (importing torch and transformers, loading the model): with
    ``runtime.keep_actors`` a pool adopts the actors the previous pool in this process parked when they were
    started for the same Ray job and resources; one that holds another model loads this pool's in place
    (its process, with torch and transformers imported, stays). Every shard names the model its actor must
    hold (``ShardTask.model_key``), so an actor Ray restarted with the model it was first built for loads the
    right one again before it encodes.
    """

    def __init__(self, job: JobConfig, max_actors: int) -> None:
        import ray

        from reembed.workers.embed_worker import EmbedWorker

        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        rt = job.runtime
        use_gpu = job.model.device == "cuda" or (job.model.device == "auto" and gpus > 0)
        if use_gpu:
            if gpus <= 0:
                raise RayError("model.device is 'cuda' but the Ray cluster has no GPU")
            capacity = int(gpus // rt.gpus_per_actor)
            cpus = rt.cpus_per_gpu_actor or gpu_actor_cpus(ray.nodes(), rt.gpus_per_actor)
            options: dict[str, Any] = {"num_gpus": rt.gpus_per_actor, "num_cpus": cpus}
        else:
            capacity = int(resources.get("CPU", 1) // rt.cpus_per_actor)
            options = {"num_cpus": rt.cpus_per_actor, "num_gpus": 0}
        n = max(1, min(rt.num_actors or capacity, max_actors))
        if rt.num_actors and rt.num_actors > capacity:
            logger.warning("runtime.num_actors=%d exceeds what the cluster fits (%d); extra actors wait for room",
                           rt.num_actors, capacity)
        slots = rt.shards_per_actor or (2 if use_gpu else 1)
        actor_cls = ray.remote(EmbedWorker).options(
            scheduling_strategy="SPREAD", max_restarts=2, max_task_retries=0, max_concurrency=slots, **options
        )
        # CPU actors: torch's threads; GPU actors: the tokenizer's (Encoder picks which from its device).
        threads = max(1, int(options["num_cpus"]))
        self.keep = rt.keep_actors
        self._gone: set[int] = set()  # actors that died and did not come back
        self._actor_cls, self._model, self._threads, self._per_actor = actor_cls, job.model, threads, slots
        # Only kept actors ever hold another model than they were built with; for the others no key is needed
        # (and the model folder is not listed again).
        self.model_key = model_key(job) if rt.keep_actors else None
        self.ready_timeout = rt.ray_init_timeout
        self._options = options
        self._lock = threading.Lock()
        self._open = True  # False once shut down: a replacement that loads later is killed, not lent out
        self.closed: str | None = None  # why no further shard is started (``close``)
        self._pending: list[Any] = []  # replacements for lost actors, not loaded yet
        self.lost = 0  # actors lost for good (their node or process gone, no restart)
        self.replaced = 0  # replacements that loaded and took shards
        self.retried: set[str] = set()  # shards whose attempt was lost with its actor (their retry ran elsewhere)
        self._restarted = False  # an actor died (and came back, or not): its restart budget is spent, not kept
        parked = None
        if self.keep:  # what parked actors must have been started for to serve this pool: the same Ray job,
            # resources, threads and slots (the model they hold is loaded in place when it differs)
            self.key = (ray.get_runtime_context().get_job_id(), tuple(sorted(options.items())), slots, threads)
            parked = _take_parked(self.key, n, exact=rt.num_actors is not None)
        infos = self._reuse(parked) if parked is not None else None
        reused = infos is not None
        if infos is None:
            self.actors = [actor_cls.remote(job.model, threads, self.model_key) for _ in range(n)]
            try:
                infos = ray.get([a.ready.remote() for a in self.actors], timeout=rt.ray_init_timeout)
            except Exception as exc:
                self.shutdown(keep=False)
                raise RayError(f"embedding actors failed to start: {type(exc).__name__}: {exc}") from None
        self.infos: list[ActorInfo] = infos
        n = len(self.actors)
        self.dim = self.infos[0].dim
        self.slots = slots * n  # shards in flight at once: the flow sizes its task runner from this one number
        self._idle: queue.Queue = queue.Queue()
        for _ in range(slots):  # an actor is lent out once per slot: that many shards run in it at once
            for actor in self.actors:
                self._idle.put(actor)
        logger.info("%s %d embedding actor(s) (%s, %d shard(s) at once each) on %d node(s)",
                    "reusing" if reused else "started", n,
                    "GPU" if use_gpu else "CPU", slots, len({i.node for i in self.infos}))

    def _reuse(self, parked: list[Any]) -> list[ActorInfo] | None:
        """Adopt parked actors once each holds this pool's model (loaded in place where it held another);
        None, and they are killed, when one does not answer or cannot load it."""
        import ray

        try:
            infos = ray.get([a.load.remote(self._model, self.model_key) for a in parked], timeout=self.ready_timeout)
        except Exception as exc:
            logger.warning("parked embedding actors did not answer (%s: %s); starting new ones",
                           type(exc).__name__, exc)
            _kill(parked)
            return None
        self.actors = parked
        return infos

    def process_shard(self, task: ShardTask, board: Any | None = None) -> ShardResult:
        import ray

        if self.model_key is not None:
            task = task.model_copy(update={"model": self._model, "model_key": self.model_key})
        actor = self._borrow()
        usable = True
        try:
            return ray.get(actor.process_shard.remote(task, board))
        except ray.exceptions.RayTaskError as exc:
            # Surface the worker's own exception (e.g. CorpusError), not Ray's wrapper with a remote traceback.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except ray.exceptions.ActorUnavailableError:
            # Its process died (killed, out of memory) and Ray is restarting it (max_restarts): the shard's retry
            # must not find it mid-restart, so it is lent out again only once it answers.
            self._restarted = True
            self.retried.add(task.shard.shard_id)
            usable = self._answers(actor)
            raise
        except ray.exceptions.RayActorError:
            # Dead for good (its node was lost, or its restarts are spent): the shard's retry goes elsewhere.
            self._restarted = True
            self.retried.add(task.shard.shard_id)
            usable = False
            self._lose(actor, "died")
            raise
        finally:
            if usable:
                self._idle.put(actor)

    def _borrow(self) -> Any:
        """An idle actor slot; a clear error, not a wait forever, once no actor is left and no replacement is
        on its way."""
        while True:
            if self.closed is not None:
                raise PoolClosed(self.closed)
            with self._lock:
                none_left = len(self._gone) == len(self.actors) and not self._pending
            if none_left:
                raise NoActorsLeft(f"no embedding actor is left: {self.lost} lost (their node or process died) "
                                   f"and no live Ray node has room for another ({self._needs()}; live nodes: "
                                   f"{_live_nodes()}). Re-run the job once the cluster has that room: it resumes "
                                   "from the shards already written")
            try:
                actor = self._idle.get(timeout=1)
            except queue.Empty:
                continue
            if id(actor) not in self._gone:  # a slot of an actor that is gone is dropped
                return actor

    def _answers(self, actor: Any) -> bool:
        """Wait (up to ``runtime.ray_init_timeout``) for a restarting actor to load its model again."""
        import ray

        try:
            ray.get(actor.load.remote(self._model, self.model_key), timeout=self.ready_timeout)
            logger.warning("an embedding actor was restarted; it takes shards again")
            return True
        except Exception as exc:  # gone for good: the other actors take its shards
            self._lose(actor, f"did not come back ({type(exc).__name__}: {exc})")
            return False

    def close(self, reason: str) -> None:
        """Start no further shard (a retry included): the run is stopping for ``reason``."""
        self.closed = reason

    def _needs(self) -> str:
        return f"an actor needs {self._options['num_cpus']} CPU" + (
            f" and {self._options['num_gpus']} GPU" if self._options["num_gpus"] else "")

    def _lose(self, actor: Any, why: str) -> None:
        """Drop a lost actor's slots and ask Ray for a replacement with the same resources: it takes shards once
        its model is loaded, if a live node (or one the autoscaler adds) has room within the start timeout."""
        import ray

        with self._lock:
            if id(actor) in self._gone:
                return
            self._gone.add(id(actor))
            self.lost += 1
            left = len(self.actors) - len(self._gone)
            new = self._actor_cls.remote(self._model, self._threads, self.model_key)
            self._pending.append(new)
        _kill([actor])
        logger.warning("an embedding actor %s; carrying on with %d, and starting a replacement (%s)",
                       why, left, self._needs())

        def wait_ready() -> None:
            try:
                info = ray.get(new.ready.remote(), timeout=self.ready_timeout)
            except Exception as exc:
                logger.warning("no replacement embedding actor within %d s (%s); %s; live nodes: %s",
                               self.ready_timeout, type(exc).__name__, self._needs(), _live_nodes())
                _kill([new])
                with self._lock:  # (shutdown may have taken it off the list already)
                    self._pending = [a for a in self._pending if a is not new]
                return
            with self._lock:
                self._pending = [a for a in self._pending if a is not new]
                if not self._open:
                    _kill([new])
                    return
                self.actors.append(new)
                self.infos.append(info)
                self.replaced += 1
                for _ in range(self._per_actor):
                    self._idle.put(new)
            logger.warning("a replacement embedding actor is loaded on node %s; it takes shards",
                           (info.node or "?")[:8])

        threading.Thread(target=wait_ready, name="reembed-replace-actor", daemon=True).start()

    def shutdown(self, keep: bool = True) -> None:
        """Kill the actors, or with ``runtime.keep_actors`` (and ``keep``: the caller's Ray outlives the run)
        park them for the next pool in this process, unless one of them died on the way or is still working on
        a shard (a run that stopped early)."""
        # Kept only with no shard in flight (every slot back in the queue): a parked actor never writes for a run
        # that ended. A pool that failed to start is shut down with keep=False, before it has slots.
        with self._lock:
            self._open = False
            pending, self._pending = self._pending, []
        _kill(pending)
        if keep and self.keep and self.actors and not self._restarted and self._idle.qsize() == self.slots:
            previous = _swap_parked(_Parked(self.key, self.actors))
            if previous is not None:
                _kill(previous.actors)
            logger.info("keeping %d embedding actor(s) loaded for the next run (runtime.keep_actors)",
                        len(self.actors))
        else:
            _kill(self.actors)
        self.actors = []

"""Every record that crosses a boundary, defined once: Prefect task arguments and results, Ray calls, shard
markers and run manifests on storage, and what the CLI prints with ``--json``.

A key typo in a dict is a runtime ``None`` three modules away; a field typo here fails where it is made.
Records read back from storage are validated on the way in (``from_json``) and ignore keys they do not know,
so a manifest written by a newer reembed still reads. The module sits at the bottom of the import graph
(pydantic, pyarrow and the settings models only), so the workers, the index and the flows all import it.
"""

from __future__ import annotations

from datetime import datetime

import logging
import uuid
from typing import Any, Literal, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from reembed.indexing.corpus import CorpusSettings, Shard
from reembed.indexing.storage import StorageOptions
from reembed.workers.settings import ChunkingSettings, ModelSettings

logger = logging.getLogger(__name__)

# The Parquet part: these columns come first, the job's payload columns follow with their own types.
BASE_COLUMNS = ("doc_id", "vector", "text_sha256", "model", "text", "source_row")
CHUNK_COLUMNS = ("chunk_index", "char_start", "char_end")
RESERVED_COLUMNS = frozenset(BASE_COLUMNS + CHUNK_COLUMNS)
NOT_PAYLOAD = frozenset({"vector"})  # every other column is copied into the Qdrant payload


POINT_NAMESPACE = uuid.UUID("6f1c1b0e-8a43-5d2b-9f5e-7e3c2a1d4b60")


def point_id(doc_id: str, chunk_index: int | None = None) -> str:
    """UUIDv5 of the document id (and chunk index when chunking), stable across runs and machines: re-running
    an upsert overwrites a point instead of adding a duplicate."""
    key = doc_id if chunk_index is None else f"{doc_id}#{chunk_index}"
    return str(uuid.uuid5(POINT_NAMESPACE, key))


def part_schema(dim: int, chunked: bool) -> pa.Schema:
    """The fixed columns of a Parquet vector part; vectors are ``fixed_size_list<float32>[dim]``."""
    fields = [
        pa.field("doc_id", pa.string()),
        pa.field("vector", pa.list_(pa.float32(), dim)),
        pa.field("text_sha256", pa.string()),
        pa.field("model", pa.string()),
        pa.field("text", pa.string()),
        pa.field("source_row", pa.int64()),
    ]
    if chunked:
        fields += [pa.field("chunk_index", pa.int32()), pa.field("char_start", pa.int64()),
                   pa.field("char_end", pa.int64())]
    return pa.schema(fields)


class Record(BaseModel):
    """Base of every record: strict when built in code, tolerant of unknown keys when read from storage."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_when_stored(cls, data: Any, info: ValidationInfo) -> Any:
        """Keys a newer reembed wrote are dropped on the way in from storage (the context reaches nested records)."""
        if info.context and info.context.get("stored") and isinstance(data, dict):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data

    @classmethod
    def from_json(cls: type[R], raw: str | bytes | dict[str, Any] | None, where: str = "") -> R | None:
        """Parse a stored record; None (with a warning naming ``where``) when it is missing or unreadable, so a
        damaged marker means "redo this shard", never a crash."""
        if raw is None:
            return None
        try:
            if isinstance(raw, dict):
                return cls.model_validate(raw, context={"stored": True})
            return cls.model_validate_json(raw, context={"stored": True})
        except ValidationError as exc:
            logger.warning("ignoring unreadable %s %s: %s", cls.__name__, where, exc.errors()[0].get("msg"))
            return None


R = TypeVar("R", bound=Record)


class LeaseFence(Record):
    """Where the run's lease lives and the token it holds it with: an actor writes a shard's output only while
    that token is still the lease's (``indexing.fence``)."""

    uri: str
    token: str
    job: str


class ShardTask(Record):
    """One shard's work as the flow hands it to an embedding actor: where to read, where to write, what to reuse."""

    shard: Shard
    corpus: CorpusSettings
    output_uri: str
    collection: str
    storage_options: StorageOptions = Field(default_factory=StorageOptions)
    model_fingerprint: str
    input_fingerprint: str
    chunking: ChunkingSettings | None = None
    reuse_uris: list[str] = Field(default_factory=list)
    reuse_since: str | None = None  # ``finished_at`` of the manifest that named ``reuse_uris``
    progress_seconds: float = 1.0
    lease: LeaseFence | None = None  # None: no lease to check (a worker called outside a run)
    # The model the pool's actors must hold for this shard (set by the pool): an actor holding another loads it
    model: ModelSettings | None = None
    model_key: str | None = None


class ActorInfo(Record):
    """What an embedding actor reports once its model is loaded: the vector size and where it runs."""

    dim: int
    model: str
    node: str | None
    pid: int
    model_key: str | None = None  # which model settings and files it holds (the pool's key for them)


class ShardResult(Record):
    """What an actor reports for one shard: its Parquet part, its quarantine file and counts, never vectors."""

    shard_id: str
    source: str
    model: str
    model_fingerprint: str
    input_fingerprint: str | None = None
    dim: int
    rows: int  # documents embedded (input rows minus quarantined)
    vector_rows: int  # rows in the part: one per document, or one per chunk
    input_rows: int
    quarantined: int
    encoded: int = 0
    reused: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    truncated_docs: int = 0
    dropped_tokens: int = 0
    truncated_ids: list[str] = Field(default_factory=list)
    part_uri: str
    quarantine_uri: str | None = None
    # Rows of the part, as [start, end) ranges, that differ from the committed version finished at
    # ``changed_since`` (new text, new payload or a new row); None when the shard was not compared with one.
    changed_rows: list[tuple[int, int]] | None = None
    changed_since: str | None = None
    read_s: float = 0.0
    reuse_s: float = 0.0  # hashing the texts and reading the previous version's vectors to reuse
    encode_s: float = 0.0
    write_s: float = 0.0  # the Parquet part and the quarantine file
    seconds: float = 0.0
    node: str | None = None
    host: str | None = None
    pid: int | None = None


class ShardMarker(ShardResult):
    """A shard's commit marker: ``written`` after its Parquet part, ``indexed`` after its points too."""

    stage: Literal["written", "indexed"]
    points: int | None = None


ShardOutcome = Literal["embedded", "skipped", "upserted", "failed"]


class ShardRow(Record):
    """One shard of a run, as the summary's per-shard table shows it: what this run did with it. ``skipped``:
    indexed by an earlier run with the same input and model; ``upserted``: written (embedded) by an earlier run
    that stopped before its points, indexed by this one; ``failed``: after its retries, with the error."""

    shard: str
    source: str | None = None
    outcome: ShardOutcome
    rows: int | None = None  # input rows of the shard
    encoded: int = 0
    reused: int = 0
    quarantined: int | None = None
    seconds: float = 0.0  # this run's seconds on the shard (read, encode, write), 0 when skipped
    actor: str | None = None  # host:pid of the actor that embedded it
    error: str | None = None

    @classmethod
    def of(cls, result: "ShardResult", outcome: ShardOutcome) -> "ShardRow":
        done_here = outcome == "embedded"
        return cls(shard=result.shard_id, source=result.source, outcome=outcome, rows=result.input_rows,
                   encoded=result.encoded if done_here else 0, reused=result.reused if done_here else 0,
                   quarantined=result.quarantined, seconds=round(result.seconds, 3) if done_here else 0.0,
                   actor=f"{result.host or result.node or '?'}:{result.pid}" if done_here and result.pid else None)


class ManifestPart(Record):
    shard_id: str
    part_uri: str
    source: str
    quarantine_uri: str | None = None


class GuardCheck(Record):
    """One guard's verdict, with the numbers behind it (kept in the manifest either way)."""

    name: str
    value: float
    limit: float
    detail: str
    passed: bool


class GuardReport(Record):
    checks: list[GuardCheck] = Field(default_factory=list)
    forced: str | None = None

    @property
    def failed(self) -> list[GuardCheck]:
        return [c for c in self.checks if not c.passed]


class GateResult(Record):
    """The quality gate's comparison of the new version with the live one."""

    metric: str
    new: str
    live: str
    new_score: float
    live_score: float | None
    tolerance: float
    passed: bool


class Manifest(Record):
    """A version's commit record (``current.json``), written last: which parts form its vector set."""

    collection: str
    alias: str
    model: str | None = None
    dim: int
    model_settings: dict[str, Any] | None = None  # the job's `model:` section, to re-create the live model
    fingerprint: str | None = None
    shards: list[str] = Field(default_factory=list)
    parts: list[ManifestPart] = Field(default_factory=list)  # empty in manifests written before parts were listed
    extra_quarantine: list[str] = Field(default_factory=list)
    vector_rows: int
    input_rows: int = 0
    chunked: bool = False
    quarantined: int = 0
    duplicates: int = 0
    guards: GuardReport | None = None
    gate: GateResult | None = None
    score: float | None = None
    forced: str | None = None
    trial: bool = False
    finished_at: str | None = None

    @property
    def gate_status(self) -> GateStatus:
        if self.gate is None:
            return "none"
        if self.gate.passed:
            return "passed"
        return "forced" if self.forced else "failed"


class ShardFailure(Record):
    shard: str
    error: str


Status = Literal["ok", "trial", "up-to-date", "blocked", "failed"]
GateStatus = Literal["passed", "failed", "forced", "none"]
Mode = Literal["new-version", "refresh", "resume", "up-to-date", "trial"]


class RunSummary(Record):
    """The outcome of ``reembed run``: version totals (every shard) and this run's work (the shards it embedded)."""

    alias: str
    collection: str
    mode: Mode
    status: Status
    model: str | None
    dim: int
    input_rows: int
    indexed: int
    encoded: int = 0
    reused: int = 0
    upserted: int = 0  # points this run wrote to the index (a refresh writes only the rows that changed)
    deleted: int = 0
    quarantined: int = 0
    quarantine: str | None = None
    duplicates: int = 0
    vector_rows: int | None = None
    tokens: int = 0
    truncated_docs: int = 0
    dropped_tokens: int = 0
    seconds: float
    startup_s: float | None = None  # flow start to the first encode: Prefect, Ray, actors loading the model
    plan_s: float | None = None  # `reembed run`: job loading, preflight and planning, before the flow starts
    docs_per_s: float | None = None
    embed_docs_per_s: float | None = None  # read -> encode -> Parquet only: bench/e2e.py's figure
    shards_total: int
    shards_done: int = 0
    shards_skipped: int = 0
    shards_embedded: int = 0
    shards_failed: int = 0
    failures: list[ShardFailure] = Field(default_factory=list)
    actors: int = 0
    actors_used: int = 0
    actors_lost: int = 0  # actors lost for good mid-run (their node or process died and did not come back)
    actors_replaced: int = 0  # replacements started for lost actors that loaded and took shards
    shards_retried: list[str] = Field(default_factory=list)  # shards whose attempt was lost with its actor
    shards_by_node: dict[str, int] = Field(default_factory=dict)
    points: int | None = None
    output: str
    index: str
    index_status: str | None = None
    guards: GuardReport | None = None
    gate: GateResult | None = None
    retired_versions: list[str] = Field(default_factory=list)
    message: str | None = None
    # Seconds by phase (``flows.phases``): planning's (index_check, listing, model, manifest, markers, preflight),
    # the actors' summed over actors (read, reuse = hashing texts and reading the previous vectors, encode,
    # assemble = the part's rows and columns put together, write) and the driver's commit steps (upsert summed over its threads, vector_set, reconcile, write_manifest)
    phases: dict[str, float] = Field(default_factory=dict)
    shards: list[ShardRow] = Field(default_factory=list)  # every shard of the plan, in plan order


class VersionInfo(Record):
    """One version of a job (a collection and its Parquet vector set), as ``reembed versions`` lists it."""

    collection: str
    physical: str | None = None  # the Qdrant collection holding it now: the version's name, or a rebuild's
    model: str | None
    dim: int | None
    live: bool
    points: int | None
    vector_rows: int | None
    score: float | None
    finished_at: str | None
    in_index: bool
    # The quality gate's verdict when the version was built: passed, failed (blocked: never served unless
    # forced), forced (failed, let through with --force REASON), none (no gate, or nothing live to compare with).
    gate: GateStatus = "none"

    @property
    def servable(self) -> bool:
        """A version that may serve: its gate passed, was forced by an operator, or did not apply."""
        return self.gate != "failed"


class RollbackResult(Record):
    alias: str
    collection: str
    previous: str | None
    forced: str | None = None  # the reason given to roll back to a gate-failed version


class ReindexResult(Record):
    collection: str  # the version rebuilt
    physical: str  # the Qdrant collection it was rebuilt into (the version's name, or <version>-r<N>)
    previous: str | None = None  # the collection that held it before, dropped after the swap
    points: int
    upserted: int  # points written from Parquet; a reindex never encodes (tests trip on any encoder it loads)
    live: bool
    source: str


class StatusInfo(Record):
    """What ``reembed status`` shows: the live collection and its manifest's totals."""

    alias: str
    collection: str | None
    physical: str | None = None  # the Qdrant collection behind the alias (differs after a reindex)
    points: int
    vector_rows: int
    dim: int | None
    model: str | None
    shards: int
    input_rows: int | None
    quarantined: int | None
    finished_at: str | None
    output: str | None
    index: str
    in_sync: bool
    last_run_status: str | None = None  # from the run log (`reembed history`)
    last_run_at: datetime | None = None
    last_success_at: datetime | None = None  # the latest run after which the alias was fresh (ok, up-to-date)
    last_success_age_s: float | None = None


class TuneDataReport(Record):
    """What `reembed tune` kept of the training judgements, and what it left out and why."""

    pairs: int = 0  # (query, relevant document) pairs kept
    queries: int = 0  # queries with at least one kept pair
    queries_not_in_file: int = 0  # judged in the qrels, absent from the queries file
    empty_queries: int = 0
    queries_without_document: int = 0  # none of their relevant documents is in the job's corpus
    pairs_without_document: int = 0  # relevant documents absent from the corpus (or with empty text)
    duplicate_pairs: int = 0


class FitSpec(Record):
    """What one training needs, sent as is to a Ray Train worker: the base model, the training columns
    (anchor, positive and, with hard negatives, negative texts, prompts not yet applied) and the validation
    set that picks the epoch."""

    model_path: str
    max_seq_length: int | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    columns: dict[str, list[str]]
    val_queries: dict[str, str]
    val_corpus: dict[str, str]
    val_relevant: dict[str, list[str]]
    epochs: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    seed: int


class FitResult(Record):
    """What a training reports back: validation nDCG@10 of the base model and after each epoch, the epoch kept."""

    base_score: float
    scores: list[float] = Field(default_factory=list)
    best_epoch: float
    best_score: float
    workers: int = 1  # Ray Train workers (1 in-process)
    device: str = "cpu"


class TuneReport(Record):
    """`reembed tune --json`, and the model card (``reembed_tune.json``) in the tuned model's folder."""

    model_path: str  # what `--set model.name=...` takes for the backfill
    base_model: str
    base_revision: str | None = None
    job_variant: str  # the job file with model.name = model_path
    train_pairs: int
    train_queries: int
    val_queries: int
    negatives: str
    hard_negatives: int = 0
    epochs: int
    best_epoch: float
    val_metric: str
    val_score: float
    base_val_score: float
    val_scores: list[float] = Field(default_factory=list)  # per epoch
    loss: str
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    seed: int
    data: dict[str, dict[str, str]] = Field(default_factory=dict)  # file -> path and sha256
    data_report: TuneDataReport
    seconds: float
    trained_on: str = "in-process"  # or "ray-train" (a TorchTrainer on the job's Ray cluster)
    workers: int = 1
    device: str = "cpu"

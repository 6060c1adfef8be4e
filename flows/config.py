"""The job file: YAML validated by pydantic, every key overridable by env var and by ``--set key=value``.

Precedence, lowest first: defaults < job file < ``REEMBED_<SECTION>__<KEY>`` env vars < ``--set`` pairs.
Relative paths resolve against the job file's folder so a job behaves the same from any working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from reembed.flows.operations.lease import LeaseSettings
from reembed.flows.operations.metrics import MetricsSettings
from reembed.indexing.corpus import CorpusSettings
from reembed.indexing.index import IndexSettings
from reembed.indexing.records import RESERVED_COLUMNS
from reembed.indexing.storage import StorageOptions
from reembed.workers.settings import ChunkingSettings, ModelSettings

ENV_PREFIX = "REEMBED_"
_JOB_FILE: ContextVar[Path | None] = ContextVar("_JOB_FILE", default=None)


class ConfigError(ValueError):
    """The job file or an override is invalid; the message says which key and why."""


class OutputSettings(BaseModel):
    """The `output:` section: where Parquet vectors go."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field("./reembed-data/vectors", description="Parquet vectors; local path, file:// or s3://")
    storage_options: StorageOptions = Field(default_factory=StorageOptions)


class GateSettings(BaseModel):
    """The `gate:` section: the new version must score at least the live one minus `tolerance` to go live."""

    model_config = ConfigDict(extra="forbid")

    queries: str | None = Field(None, description="BEIR queries.jsonl for a retrieval gate")
    qrels: str | None = Field(None, description="qrels TSV for a retrieval gate")
    pairs: str | None = Field(None, description="sentence pairs with gold scores for a similarity gate")
    metric: str | None = Field(None, description="ndcg@10 | recall@100 | mrr@10 (retrieval), spearman | pearson (pairs)")
    tolerance: float = Field(0.01, ge=0, description="allowed drop, as a fraction (0.01 = one point)")

    def resolved_metric(self) -> str:
        return self.metric or ("spearman" if self.pairs else "ndcg@10")


class GuardSettings(BaseModel):
    """The `guards:` section: how much a run may change the live version before it stops and asks for --force.

    A run that quarantines most of its input or would delete most of what is live is far likelier to be a
    mistake (a wrong id key, a truncated upload, a misconfigured template) than a real change; rclone's
    ``--max-delete`` is the same idea. The checks run before the reconcile deletes any point and before the
    alias moves; ``reembed run --force REASON`` overrides them and records the reason in the manifest.
    """

    model_config = ConfigDict(extra="forbid")

    max_quarantined_fraction: float = Field(
        0.05, ge=0, le=1, description="stop when more than this fraction of input rows is quarantined")
    max_deleted_fraction: float = Field(
        0.2, ge=0, le=1, description="stop when more than this fraction of the live points would be deleted")
    allow_empty: bool = Field(False, description="allow a run that leaves the collection with no points")


class HistorySettings(BaseModel):
    """The `history:` section of a job file: how long the run log keeps its records."""

    model_config = ConfigDict(extra="forbid")

    keep_days: float | None = Field(
        None, gt=0, description="after each run, remove run records older than this many days (the latest run "
        "and the latest success are always kept); null = keep every record")


class RuntimeSettings(BaseModel):
    """The `runtime:` section: Ray and sharding."""

    model_config = ConfigDict(extra="forbid")

    ray_address: str | None = Field(None, description="null = start a local Ray; else a cluster address (host:port or auto)")
    num_actors: int | None = Field(None, ge=1, description="embedding actors; auto = one per GPU, else cluster CPUs / cpus_per_actor")
    cpus_per_actor: float = Field(1, gt=0, description="CPUs each actor asks Ray for (CPU runs)")
    gpus_per_actor: float = Field(1, gt=0, le=1, description="GPUs each actor asks Ray for when the job runs on GPUs")
    cpus_per_gpu_actor: float | None = Field(
        None, gt=0,
        description="CPUs a GPU actor asks Ray for; its tokenizer runs on that many threads so the GPU does not "
        "wait for text; auto = the GPU nodes' CPUs per GPU actor minus one, between 1 and 16",
    )
    shard_size_mb: float = Field(64, gt=0, description="target shard size; smaller files are one shard each")
    shard_rows: int | None = Field(None, ge=1, description="also cut shards at this many rows")
    ship_code: bool | None = Field(None, description="send reembed's code to the cluster (runtime_env py_modules); auto = when ray_address is set")
    ray_init_timeout: int = Field(120, ge=1, description="seconds to wait for actors to load the model")
    shards_per_actor: int | None = Field(
        None, ge=1, le=8,
        description="shards one actor works on at once (threads); auto = 2 on GPU, so one shard's read and "
        "Parquet write overlap another's encoding, 1 on CPU",
    )
    min_shards: int | None = Field(
        None, ge=1,
        description="cut files smaller than shard_size_mb further until the plan has this many shards, so every "
        "actor has work; auto = twice the expected actors x shards_per_actor",
    )
    progress_seconds: float = Field(
        5, gt=0, description="seconds between progress reports (actors to the driver, and log lines when not a terminal)")
    keep_actors: bool = Field(
        False,
        description="after a run, keep its embedding actors loaded for the next run in the same process on the "
        "same resources (a notebook, a service calling run_job, a test session), which loads its own model in them "
        "where it differs; only where that process's Ray outlives the run; parked actors hold their Ray resources "
        "until reused or released",
    )


class JobConfig(BaseSettings):
    """A reembed job: what to embed, with which model, and where vectors and the index live."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    name: str = Field(..., description="the Qdrant alias users search")
    corpus: CorpusSettings
    model: ModelSettings = Field(default_factory=ModelSettings)
    chunking: ChunkingSettings | None = Field(None, description="null = one vector per document (truncated, and counted)")
    gate: GateSettings | None = Field(None, description="quality gate checked before the alias moves to a new version")
    guards: GuardSettings = Field(default_factory=GuardSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    lease: LeaseSettings = Field(default_factory=LeaseSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)

    @field_validator("name")
    @classmethod
    def _name_is_collection_safe(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}", value):
            raise ValueError("use letters, digits, '_', '-' and '.', starting with a letter or digit")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # --set pairs (init) over env vars over the job file; the file is named by load_job through _JOB_FILE.
        job_file = _JOB_FILE.get()
        if job_file is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=job_file, yaml_file_encoding="utf-8"))

    def fingerprint(self, dim: int | None = None) -> str:
        """What shapes the vectors; a change in any of it means a new collection and vector set."""
        m = self.model
        shape = {
            "model": m.name, "revision": m.revision, "pooling": m.pooling, "normalize": m.normalize,
            "max_seq_length": m.max_seq_length, "truncate_dim": m.truncate_dim,
            "document_prompt": m.document_prompt, "dim": dim,
        }
        if self.chunking is not None:
            shape["chunking"] = self.chunking.model_dump()
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]

    def collection_name(self, dim: int | None = None, trial: bool = False) -> str:
        """``<name>-<fingerprint>``; a trial run (``run --limit``) writes ``<name>-trial-<fingerprint>``, which
        no alias, version listing or retention ever picks up."""
        return f"{self.name}-{'trial-' if trial else ''}{self.fingerprint(dim)}"


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def override_value(raw: str) -> Any:
    """A ``--set`` value: a number, boolean or null when it reads as one, a list when written as ``[a, b]``,
    otherwise the string as typed, so templates (``{title} {text}``), URLs and colons pass through unchanged."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, list) and raw.lstrip().startswith("[") and all(
            v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return value
    return raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["model.name=x", "runtime.num_actors=2"]`` -> nested dict (values as :func:`override_value` reads them)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. model.name=all-MiniLM-L6-v2")
        key, raw = pair.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set {pair!r}: the key before '=' is empty")
        _set_path(tree, key.strip(), override_value(raw))
    return tree


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable dotted key of a settings model (``model.name``, ``corpus.storage_options.key``, ...)."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        for arg in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                paths.extend(_field_paths(arg, f"{path}."))
    return paths


def check_env(environ: dict[str, str] | None = None) -> None:
    """Unknown ``REEMBED_<SECTION>__<KEY>`` variables are errors, as unknown keys in the file are.

    pydantic-settings ignores variables that match no field, so a typo (``REEMBED_MODLE__NAME``) would
    silently leave the setting at its default. Command-line twins (``REEMBED_SEARCH_K``, one underscore)
    are click's and are not checked here.
    """
    environ = dict(os.environ if environ is None else environ)
    known = {p.upper().replace(".", "__") for p in _field_paths(JobConfig)}
    for var in sorted(environ):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or "__" not in upper:
            continue
        key = upper[len(ENV_PREFIX):]
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
        raise ConfigError(f"environment variable {var} names no job setting{hint}")


def _blame(job_path: Path, pairs: list[str], exc: ValidationError) -> str:
    """Name where each bad value came from: the ``--set`` pair, the environment variable, or the file."""
    given = {p.split("=", 1)[0].strip(): p for p in pairs}
    problems = []
    for error in exc.errors():
        dotted = ".".join(str(p) for p in error["loc"])
        env_var = ENV_PREFIX + dotted.upper().replace(".", "__")
        where = next((f"--set {given[k]!r}" for k in given if dotted == k or dotted.startswith(k + ".")), None)
        if where is None and any(v.upper() == env_var for v in os.environ):
            where = f"environment variable {env_var}"
        problems.append(f"{where or job_path}: {dotted}: {error['msg']}")
    return "; ".join(problems)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _resolve(base: Path, uri: str) -> str:
    if not _is_local(uri):
        return uri
    raw = uri[len("file://"):] if uri.startswith("file://") else uri
    path = Path(raw).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def load_job(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobConfig:
    """Read a job file, apply env vars and ``--set`` overrides, validate, and resolve relative paths."""
    job_path = Path(path)
    if not job_path.is_file():
        raise ConfigError(f"job file {job_path} not found")
    try:
        data = yaml.safe_load(job_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{job_path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{job_path}: expected a mapping of sections at the top level")
    check_env()
    pairs = overrides or []
    token = _JOB_FILE.set(job_path)
    try:
        job = JobConfig(**parse_overrides(pairs))
    except ValidationError as exc:
        raise ConfigError(_blame(job_path, pairs, exc)) from None
    finally:
        _JOB_FILE.reset(token)
    clash = RESERVED_COLUMNS.intersection(job.corpus.payload)
    if clash:
        raise ConfigError(f"{job_path}: corpus.payload may not name reserved column(s) {sorted(clash)}")
    base = job_path.resolve().parent
    job.corpus.uri = _resolve(base, job.corpus.uri)
    job.output.uri = _resolve(base, job.output.uri)
    job.index.path = _resolve(base, job.index.path)
    if job.gate is not None:
        if not job.gate.pairs and not (job.gate.queries and job.gate.qrels):
            raise ConfigError(f"{job_path}: gate needs queries + qrels (retrieval) or pairs (similarity)")
        for key in ("queries", "qrels", "pairs"):
            value = getattr(job.gate, key)
            if value:
                setattr(job.gate, key, _resolve(base, value))
    for section in (job.corpus, job.output):
        if not _is_local(section.uri):
            section.storage_options = section.storage_options.with_env_defaults()
    if not _is_local(job.model.name):  # a tuned model on object storage: read with its own options, or the output's
        job.model.storage_options = (job.model.storage_options or job.output.storage_options).with_env_defaults()
    else:
        model_path = Path(job.model.name).expanduser()
        if job.model.name.startswith((".", "/", "~")) or (base / model_path).is_dir():
            job.model.name = _resolve(base, job.model.name)
    return job

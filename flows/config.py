"""The job file: YAML validated by pydantic, every key overridable by env var and by ``--set key=value``.

Precedence, lowest first: defaults < job file < ``REEMBED_<SECTION>__<KEY>`` env vars < ``--set`` pairs.
Relative paths resolve against the job file's folder so a job behaves the same from any working directory.
"""

from __future__ import annotations

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

from indexing.corpus import CorpusSettings
from indexing.qdrant_index import IndexSettings
from indexing.storage import StorageOptions
from workers.settings import ChunkingSettings, ModelSettings

ENV_PREFIX = "REEMBED_"
_JOB_FILE: ContextVar[Path | None] = ContextVar("_JOB_FILE", default=None)
_RESERVED_COLUMNS = {"doc_id", "vector", "text_sha256", "model", "text", "source_row", "chunk_index",
                     "char_start", "char_end"}


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


class JobConfig(BaseSettings):
    """A reembed job: what to embed, with which model, and where vectors and the index live."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    name: str = Field(..., description="the Qdrant alias users search")
    corpus: CorpusSettings
    model: ModelSettings = Field(default_factory=ModelSettings)
    chunking: ChunkingSettings | None = Field(None, description="null = one vector per document (truncated, and counted)")
    gate: GateSettings | None = Field(None, description="quality gate checked before the alias moves to a new version")
    output: OutputSettings = Field(default_factory=OutputSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)

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

    def collection_name(self, dim: int | None = None) -> str:
        return f"{self.name}-{self.fingerprint(dim)}"


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["model.name=x", "runtime.num_actors=2"]`` -> nested dict; values parse as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. model.name=all-MiniLM-L6-v2")
        key, raw = pair.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return tree


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
    token = _JOB_FILE.set(job_path)
    try:
        job = JobConfig(**parse_overrides(overrides or []))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{job_path}: {problems}") from None
    finally:
        _JOB_FILE.reset(token)
    clash = _RESERVED_COLUMNS.intersection(job.corpus.payload)
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
    model_path = Path(job.model.name).expanduser()
    if job.model.name.startswith((".", "/", "~")) or (base / model_path).is_dir():
        job.model.name = _resolve(base, job.model.name)
    return job

"""The `model:` section of a job file.

Every field left as ``None`` is read from the model's own sentence-transformers files
(``1_Pooling/config.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``),
so the defaults are the model authors' choices and the job file only states deliberate overrides.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from reembed.indexing.storage import StorageOptions

PoolingMode = Literal["cls", "mean", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"]
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
Attention = Literal["auto", "packed", "padded"]


class ChunkingSettings(BaseModel):
    """The `chunking:` section: split long documents into overlapping token windows, one point each."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(..., ge=8, description="tokens per chunk (text tokens, before special tokens and prompt)")
    overlap: int = Field(0, ge=0, description="tokens shared by consecutive chunks")


class ModelSettings(BaseModel):
    """How to turn text into vectors."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("all-MiniLM-L6-v2", description="bundled name, local folder, s3:// folder (copied to a local "
                      "cache once per version of its files), or hub id where a hub is reachable")
    revision: str | None = Field(None, description="hub revision, when `name` is a hub id")
    storage_options: StorageOptions | None = Field(
        None, description="a model folder on object storage (`name: s3://...`, as `reembed tune` writes it): "
        "endpoint and credentials; default: the output's")
    pooling: PoolingMode | None = Field(None, description="override the model's 1_Pooling/config.json")
    normalize: bool = Field(True, description="L2-normalise vectors (cosine similarity becomes a dot product)")
    max_seq_length: int | None = Field(None, description="override sentence_bert_config.json's max_seq_length")
    truncate_dim: int | None = Field(None, description="Matryoshka: keep the first N dimensions")
    query_prompt: str | None = Field(None, description="text put before every query (default: the model's `query` prompt)")
    document_prompt: str | None = Field(None, description="text put before every document (default: the model's document prompt)")
    device: Device = Field("auto", description="auto = cuda when available, else cpu")
    dtype: DType = Field("auto", description="auto = float16 on cuda, float32 on cpu")
    max_batch_tokens: int | None = Field(
        None, ge=16, description="token budget per forward pass (padded tokens); auto: 2048 on cpu, 65536 on cuda"
    )
    cpu_threads: int | None = Field(None, ge=1, description="torch intra-op threads on cpu, tokenizer threads on cuda; auto = the CPUs Ray gave the actor")
    attention: Attention = Field(
        "auto",
        description="packed = padding-free batches (BERT-family encoders; varlen flash attention on cuda in "
        "float16/bfloat16, else padded attention inside), padded = the Hugging Face forward on padded batches; "
        "auto = packed where varlen flash attention runs (a start-up check runs the kernel once; if it fails "
        "or disagrees with padded attention, padded is used and the reason logged), else padded",
    )
    tokenize_ahead: bool | None = Field(
        None, description="tokenize and collate the next batches in a background thread while the model runs; auto = on"
    )

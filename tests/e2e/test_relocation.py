"""A relocatable vector store: a store moved on disk, or copied to S3 (a real SeaweedFS) and back, keeps refresh,
reindex, rollback and search working, with nothing re-encoded but what changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import s3fs

from conftest import ROOT, no_encoding
from reembed.flows.config import load_job
from reembed.flows.run_flow import run_job
from reembed.flows.versions import list_versions, reindex, rollback
from reembed.indexing.index import open_index
from reembed.indexing.vector_store import VectorStore
from reembed.workers.encoder import Encoder

SAMPLE = ROOT / "examples" / "sample" / "job.yaml"
QUERY = "why does bread rise"


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(SAMPLE.parent / "corpus.jsonl", corpus)
    return corpus


def _change_one_document(corpus: Path) -> None:
    lines = corpus.read_text(encoding="utf-8").splitlines()
    doc = json.loads(lines[0])
    doc["text"] += " Boosters remind it years later."
    lines[0] = json.dumps(doc, ensure_ascii=False)
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _job(corpus: Path, output: str, index: Path, *extra: str):
    return load_job(SAMPLE, [f"corpus.uri={corpus}", f"output.uri={output}", f"index.path={index}", *extra])


def _top(job, k: int = 10) -> list[str]:
    vector = Encoder(job.model).encode([QUERY], kind="query")[0][0]
    with open_index(job.index) as index:
        return [h["doc_id"] for h in index.search(job.name, vector, k)]


def _named_files_exist(store: VectorStore) -> bool:
    fs_parts = store.current_parts()
    from reembed.indexing.storage import filesystem

    return all(filesystem(u, store.options)[0].exists(filesystem(u, store.options)[1]) for u in fs_parts)


def test_a_moved_store_refreshes_only_what_changed(tmp_path, ray_session) -> None:
    corpus = _corpus(tmp_path)
    first = run_job(_job(corpus, str(tmp_path / "a" / "vectors"), tmp_path / "a" / "qdrant"))
    assert first.points == 40
    shutil.move(tmp_path / "a", tmp_path / "b")  # the whole store and the embedded index, to another folder
    _change_one_document(corpus)
    job = _job(corpus, str(tmp_path / "b" / "vectors"), tmp_path / "b" / "qdrant")
    second = run_job(job)
    assert (second.status, second.mode, second.collection) == ("ok", "refresh", first.collection)
    assert second.encoded == 1 and second.reused + 20 * second.shards_skipped == 39  # nothing else re-encoded
    assert second.points == second.vector_rows == 40 and second.deleted == 0
    store = VectorStore(job.output.uri, second.collection)
    assert all(u.startswith(str(tmp_path / "b")) for u in store.current_parts()) and _named_files_exist(store)
    with open_index(job.index) as index:
        assert index.count(job.name) == store.read_manifest().vector_rows == 40  # in sync
    assert _top(job)[0] == "doc-002"


def test_a_store_copied_to_s3_and_back_keeps_working(tmp_path, ray_session, s3_server) -> None:
    corpus = _corpus(tmp_path)
    local = _job(corpus, str(tmp_path / "local" / "vectors"), tmp_path / "local" / "qdrant")
    older = run_job(local.model_copy(update={"model": local.model.model_copy(update={"pooling": "cls"})}))
    newer = run_job(local)  # live; the cls version stays as an older version to roll back to
    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"],
                           client_kwargs={"endpoint_url": s3_server["endpoint"]}, skip_instance_cache=True)
    fs.put(str(tmp_path / "local" / "vectors"), "reembed/copied/vectors", recursive=True)
    assert fs.exists(f"reembed/copied/vectors/{newer.collection}/current.json")
    shutil.copytree(tmp_path / "local" / "qdrant", tmp_path / "s3-qdrant")
    s3 = [f"output.storage_options.endpoint_url={s3_server['endpoint']}",
          f"output.storage_options.key={s3_server['key']}", f"output.storage_options.secret={s3_server['secret']}"]
    _change_one_document(corpus)
    remote = _job(corpus, "s3://reembed/copied/vectors", tmp_path / "s3-qdrant", *s3)
    refreshed = run_job(remote)
    assert (refreshed.status, refreshed.mode, refreshed.encoded, refreshed.points) == ("ok", "refresh", 1, 40)
    store = VectorStore(remote.output.uri, refreshed.collection, remote.output.storage_options)
    assert all(u.startswith("s3://reembed/copied/vectors/") for u in store.current_parts())
    assert _named_files_exist(store)
    with open_index(remote.index) as index, no_encoding():
        rebuilt = reindex(remote, index, None)  # from the parts on S3
        assert rebuilt.points == 40 and rebuilt.live
        assert rollback(remote, index, None).collection == older.collection
        assert rollback(remote, index, newer.collection).collection == newer.collection
    assert _top(remote)[0] == "doc-002"

    # And back to a local disk: the S3 copy's manifests resolve under the new root as well.
    fs.get("reembed/copied/vectors", str(tmp_path / "back" / "vectors"), recursive=True)
    shutil.copytree(tmp_path / "s3-qdrant", tmp_path / "back" / "qdrant")
    back = _job(corpus, str(tmp_path / "back" / "vectors"), tmp_path / "back" / "qdrant")
    again = run_job(back)
    assert (again.status, again.points) == ("up-to-date", 40)
    with open_index(back.index) as index:
        assert {v.collection for v in list_versions(back, index)} == {older.collection, newer.collection}
        assert reindex(back, index, None).points == 40

"""The same job against a real S3 server (SeaweedFS on 127.0.0.1) and on a two-node Ray cluster.

Both must reproduce a local run of the same corpus: same documents, same counts, same vectors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs

from conftest import SeaweedS3, _stop, free_port, kill_node, last_json, process_tree, ray_node, reembed_cli, run_cli, wait_nodes, write_jsonl
from reembed.flows.config import load_job
from reembed.flows.operations.run_log import RunLog
from reembed.flows.operations.lease import LeaseSettings, job_lease
from reembed.flows.run_flow import run_job
from reembed.indexing.storage import StorageOptions
from reembed.indexing.vector_store import VectorStore, arrow_to_vectors


N_DOCS = 200


def _vectors(store: VectorStore) -> dict[str, np.ndarray]:
    table = store.read_all(["doc_id", "vector"])
    return dict(zip(table.column("doc_id").to_pylist(), arrow_to_vectors(table.column("vector"))))


def _assert_same_vectors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    cos = np.array([float(np.dot(a[k], b[k])) for k in a])
    assert cos.min() >= 0.99999, f"worst cosine {cos.min()}"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, scifact_docs, ray_session):
    folder = tmp_path_factory.mktemp("ref")
    docs = scifact_docs[1000 : 1000 + N_DOCS]
    write_jsonl(folder / "corpus.jsonl", docs)
    (folder / "job.yaml").write_text(
        "name: slice\ncorpus: {uri: corpus.jsonl, id: _id, text: '{title} {text}'}\nruntime: {shard_rows: 50}\n"
    )
    job = load_job(folder / "job.yaml")
    summary = run_job(job)
    return {"docs": docs, "summary": summary.model_dump(mode="json"),
            "vectors": _vectors(VectorStore(job.output.uri, summary.collection)),
            "folder": folder}


def test_s3_corpus_and_output_match_local_run(local_reference, s3_server, tmp_path: Path, ray_address) -> None:
    """The console script, on the session's Ray, reads its corpus from S3 and writes vectors, lease and run log
    there."""
    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"],
                           client_kwargs={"endpoint_url": s3_server["endpoint"]}, skip_instance_cache=True)
    fs.put_file(str(local_reference["folder"] / "corpus.jsonl"), "reembed/corpus/slice.jsonl")
    job = tmp_path / "job.yaml"
    # Corpus credentials from the job file, output credentials from the AWS env vars: both paths are real.
    job.write_text(
        "name: slice\n"
        "corpus:\n"
        "  uri: s3://reembed/corpus/slice.jsonl\n  id: _id\n  text: '{title} {text}'\n"
        f"  storage_options: {{endpoint_url: '{s3_server['endpoint']}', key: {s3_server['key']}, "
        f"secret: {s3_server['secret']}}}\n"
        "output: {uri: s3://reembed/vectors}\n"
        "runtime: {shard_rows: 50}\n"
    )
    # On the session's Ray, with the two actors a local Ray on this machine gives the reference run (on a
    # cluster, the plan would otherwise expect eight and cut the corpus finer than the reference's four shards).
    env = {"AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
           "AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_DEFAULT_REGION": "us-east-1",
           "REEMBED_RUNTIME__RAY_ADDRESS": ray_address, "REEMBED_RUNTIME__NUM_ACTORS": "2"}
    res = run_cli("run", str(job), "--set", f"index.path={tmp_path / 'qdrant'}", "--json", env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert s3_server["secret"] not in res.stdout + res.stderr
    summary = last_json(res.stdout)
    ref = local_reference["summary"]
    assert summary["input_rows"] == summary["indexed"] == summary["points"] == ref["points"] == N_DOCS
    assert summary["shards_total"] == ref["shards_total"] == 4
    assert fs.ls("reembed/vectors/" + summary["collection"] + "/vectors")
    options = StorageOptions(endpoint_url=s3_server["endpoint"], key=s3_server["key"], secret=s3_server["secret"])
    _assert_same_vectors(_vectors(VectorStore("s3://reembed/vectors", summary["collection"], options)),
                         local_reference["vectors"])
    (record,) = RunLog("s3://reembed/vectors", "slice", options).records()  # the run log lives on S3 too
    assert (record.status, record.encoded, record.points) == ("ok", N_DOCS, N_DOCS)
    assert not fs.exists("reembed/vectors/_leases/slice.json")  # the lease was released


def _s3_job(server: SeaweedS3, folder: Path, tmp_path: Path,
            ray_address: str) -> tuple[Path, dict[str, str], s3fs.S3FileSystem]:
    """The reference slice's corpus on ``server``, and a job reading it from there and writing vectors (and its
    lease and run log) there too; the environment that carries the credentials and the session Ray's address
    (runs join it: the outage is the store's, not Ray's)."""
    fs = s3fs.S3FileSystem(key=server.key, secret=server.secret, client_kwargs={"endpoint_url": server.endpoint},
                           skip_instance_cache=True)
    fs.put_file(str(folder / "corpus.jsonl"), "reembed/corpus/slice.jsonl")
    job = tmp_path / "job.yaml"
    job.write_text("name: slice\ncorpus: {uri: s3://reembed/corpus/slice.jsonl, id: _id, text: '{title} {text}'}\n"
                   f"output: {{uri: s3://reembed/vectors}}\nindex: {{path: {tmp_path / 'qdrant'}}}\n"
                   "runtime: {shard_rows: 25}\n")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret,
           "AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           "REEMBED_RUNTIME__RAY_ADDRESS": ray_address}
    return job, env, fs


def _run_with_outage(job: Path, env: dict[str, str], server: SeaweedS3, fs: s3fs.S3FileSystem,
                     outage_s: float | None, tmp_path: Path) -> subprocess.CompletedProcess:
    """`reembed run` with the S3 server SIGKILLed once the first shard marker is on it, and started again (same
    data, same ports) ``outage_s`` later, or, with None, only after the run has ended."""
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    cmd = [*reembed_cli(), "run", str(job), "--json", "--progress", "log"]
    with out.open("w") as stdout, err.open("w") as stderr:
        run = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
        down_at = None
        deadline = time.monotonic() + 600
        while run.poll() is None and time.monotonic() < deadline:
            if down_at is None:
                fs.invalidate_cache()
                if fs.glob("reembed/vectors/*/shards/*.json"):
                    server.stop(kill=True)
                    down_at = time.monotonic()
            elif outage_s is not None and server.proc is None and time.monotonic() - down_at >= outage_s:
                server.start()
            time.sleep(0.2)
        if run.poll() is None:
            run.kill()
        run.wait()
    assert down_at is not None, "the run ended before its first shard marker was on S3"
    if server.proc is None:
        server.start()
    return subprocess.CompletedProcess(cmd, run.returncode, out.read_text(), err.read_text())


def test_an_s3_outage_shorter_than_the_retries_is_ridden_out(local_reference, tmp_path: Path, ray_address) -> None:
    """The S3 server is killed mid-run and back 6 s later: the bounded, logged retries ride it out and the run
    ends as a clean run does."""
    server = SeaweedS3(tmp_path / "seaweed")
    server.data.mkdir()
    server.start()
    try:
        job, env, fs = _s3_job(server, local_reference["folder"], tmp_path, ray_address)
        res = _run_with_outage(job, env, server, fs, 6.0, tmp_path)
        assert res.returncode == 0, res.stderr[-4000:]
        assert "an S3 request did not go through; retrying it in" in res.stderr  # logged, never silent
        summary = last_json(res.stdout)
        assert summary["points"] == summary["indexed"] == summary["input_rows"] == N_DOCS
        assert summary["duplicates"] == 0 and summary["shards_failed"] == 0 and summary["vector_rows"] == N_DOCS
        assert summary["quarantined"] == 0  # a read cut off by the outage is retried, never taken for a bad file
        options = StorageOptions(endpoint_url=server.endpoint, key=server.key, secret=server.secret)
        _assert_same_vectors(_vectors(VectorStore("s3://reembed/vectors", summary["collection"], options)),
                             local_reference["vectors"])
    finally:
        server.stop()


def test_an_s3_outage_past_the_retries_stops_the_run_and_a_rerun_resumes(local_reference, tmp_path: Path,
                                                                         ray_address) -> None:
    """The S3 server stays away: the run stops within its bounded retries with one line that says so, and a
    re-run once it is back completes with nothing lost or duplicated."""
    server = SeaweedS3(tmp_path / "seaweed")
    server.data.mkdir()
    server.start()
    try:
        job, env, fs = _s3_job(server, local_reference["folder"], tmp_path, ray_address)
        res = _run_with_outage(job, env, server, fs, None, tmp_path)
        assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-4000:]
        (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert "the object store did not answer" in line and server.endpoint in line, line
        assert "Re-run the job once the store is back" in line and "Traceback" not in res.stderr
        assert "retrying it in" in res.stderr and "Retries are exhausted" in res.stderr
        again = subprocess.run([*reembed_cli(), "run", str(job), "--json"], capture_output=True, text=True,
                               env=env, timeout=600)
        assert again.returncode == 0, again.stderr[-4000:]
        summary = last_json(again.stdout)
        assert summary["mode"] == "resume" and summary["shards_embedded"] < 8
        assert summary["points"] == summary["indexed"] == summary["input_rows"] == N_DOCS
        assert summary["duplicates"] == 0 and summary["vector_rows"] == N_DOCS
        options = StorageOptions(endpoint_url=server.endpoint, key=server.key, secret=server.secret)
        _assert_same_vectors(_vectors(VectorStore("s3://reembed/vectors", summary["collection"], options)),
                             local_reference["vectors"])
    finally:
        server.stop()


def test_the_job_lease_on_s3(s3_server) -> None:
    """No locks on an object store: write, settle, read back; a second holder is refused, naming the first."""
    options = StorageOptions(endpoint_url=s3_server["endpoint"], key=s3_server["key"], secret=s3_server["secret"])
    with job_lease("s3://reembed/lease-test", "docs", LeaseSettings(), "first run", options) as lease:
        lease.check()
        script = ("import sys\n"
                  "from reembed.flows.operations.lease import LeaseHeld, LeaseSettings, job_lease\n"
                  "from reembed.indexing.storage import StorageOptions\n"
                  "opts = StorageOptions(endpoint_url=sys.argv[1], key=sys.argv[2], secret=sys.argv[3])\n"
                  "try:\n"
                  "    with job_lease('s3://reembed/lease-test', 'docs', LeaseSettings(), 'second', opts):\n"
                  "        print('acquired')\n"
                  "except LeaseHeld as exc:\n"
                  "    print(exc)\n")
        res = subprocess.run([sys.executable, "-c", script, s3_server["endpoint"], s3_server["key"],
                              s3_server["secret"]], capture_output=True, text=True, timeout=120)
        assert "another run of job 'docs' is in progress: first run on" in res.stdout, res.stdout + res.stderr
    with job_lease("s3://reembed/lease-test", "docs", LeaseSettings(), "after release", options):
        pass


_WRITER = """\
import sys
from reembed.flows.operations.lease import LeaseLost, LeaseSettings, job_lease
from reembed.indexing.storage import StorageOptions
opts = StorageOptions(endpoint_url=sys.argv[1], key=sys.argv[2], secret=sys.argv[3])
with job_lease(sys.argv[4], 'docs', LeaseSettings(ttl=3, conditional_writes=sys.argv[5] == 'conditional'),
               'writer a', opts) as lease:
    assert lease.mode == sys.argv[5], lease.mode
    print('held', lease.record.token, flush=True)
    for _ in sys.stdin:  # each line asks: do you still hold it? (the answer a write would act on)
        try:
            lease.fence()
            print('holds', flush=True)
        except LeaseLost as exc:
            print('lost', exc, flush=True)
"""


@pytest.mark.parametrize("mode", ["conditional", "settle"])
@pytest.mark.parametrize("resume_after", [1.5, 4.0, 5.5])
def test_two_writers_on_s3_never_both_hold_the_lease(s3_server, resume_after: float, mode: str) -> None:
    """Writer A (another process) holds the lease on a real SeaweedFS and is suspended (SIGSTOP: a stalled VM)
    while writer B waits to take it over; A is resumed at a different moment in each case, before, around
    and after B's takeover (B looks every 2 s and judges A's lease stale once its renewals stood still for
    3 s, so it writes at about 4 s, settles 1 s and reads back). Whatever the interleaving, exactly one of
    them holds it afterwards (A answers as its next write would: through ``fence``), the lease object names
    that one, and A's renewal never erased B's takeover. Both ways of writing it: conditional writes
    (SeaweedFS honours If-Match, as S3 does) and, turned off, write-settle-read."""
    from reembed.flows.operations.lease import _read, lease_uri

    options = StorageOptions(endpoint_url=s3_server["endpoint"], key=s3_server["key"], secret=s3_server["secret"])
    root = f"s3://reembed/lease-race-{mode}-{str(resume_after).replace('.', '-')}"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, s3_server["endpoint"], s3_server["key"],
                               s3_server["secret"], root, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        held, token_a = writer.stdout.readline().split()
        assert held == "held"
        os.kill(writer.pid, signal.SIGSTOP)
        resume = threading.Timer(resume_after, os.kill, (writer.pid, signal.SIGCONT))
        resume.start()
        try:
            b = _acquire_or_none(root, options, mode)
        finally:
            resume.join()
        writer.stdin.write("?\n")
        writer.stdin.flush()
        a_answer = writer.stdout.readline()
        a_holds = a_answer.startswith("holds")
        b_holds = b is not None and b.lost is None and _still_holds(b)
        current = _read(lease_uri(root, "docs"), options)
        assert a_holds != b_holds, (a_answer, b and b.lost)  # never both, never neither
        assert current.token == (token_a if a_holds else b.record.token)
        if b is not None and not b_holds:
            assert "lease lost to" in b.lost
        if not a_holds:
            assert "lease lost to" in a_answer
        if b is not None:
            b.release()
    finally:
        writer.kill()
        writer.wait(timeout=30)


def _acquire_or_none(root: str, options: StorageOptions, mode: str):
    """Writer B: wait up to 8 s for the lease (taken once A's renewals have stood still for a ttl)."""
    from reembed.flows.operations.lease import LeaseHeld, _acquire, lease_uri

    settings = LeaseSettings(ttl=3, conditional_writes=mode == "conditional")
    try:
        lease = _acquire(lease_uri(root, "docs"), "docs", settings, "writer b", options, wait=8)
        assert lease.mode == mode
        return lease
    except LeaseHeld:
        return None


def _still_holds(lease) -> bool:
    from reembed.flows.operations.lease import LeaseLost

    try:
        lease.check()  # read now
        return True
    except LeaseLost:
        return False


def test_wrong_s3_credentials_fail_fast(s3_server, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: slice\n"
        f"corpus: {{uri: s3://reembed/corpus/slice.jsonl, id: _id, storage_options: "
        f"{{endpoint_url: '{s3_server['endpoint']}', key: wrong, secret: wrong-secret-value}}}}\n"
    )
    res = run_cli("run", str(job), "--set", f"index.path={tmp_path / 'qdrant'}")
    assert res.returncode == 2
    assert "error:" in res.stderr and "Traceback" not in res.stderr
    assert "wrong-secret-value" not in res.stderr


def test_two_node_ray_cluster_matches_local_run(local_reference, tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                      "--include-dashboard=false", "--resources={\"node_a\": 1}"], tmp_path / "head.log")
    worker = None
    try:
        time.sleep(3)
        worker = ray_node([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                            "--resources={\"node_b\": 1}"], tmp_path / "worker.log")
        wait_nodes(address, 2)
        res = run_cli("run", str(local_reference["folder"] / "job.yaml"), "--json",
                      "--set", f"runtime.ray_address={address}", "--set", "runtime.shard_rows=25",
                      "--set", f"output.uri={tmp_path / 'vectors'}", "--set", f"index.path={tmp_path / 'qdrant'}")
        assert res.returncode == 0, res.stderr[-4000:]
        summary = last_json(res.stdout)
        assert summary["shards_total"] == 8 and summary["actors"] == 2
        by_node = summary["shards_by_node"]
        assert len(by_node) == 2 and all(n >= 1 for n in by_node.values()), by_node
        assert sum(by_node.values()) == 8
        assert summary["points"] == summary["indexed"] == N_DOCS
        _assert_same_vectors(_vectors(VectorStore(str(tmp_path / "vectors"), summary["collection"])),
                             local_reference["vectors"])
    finally:
        for proc in (worker, head):
            if proc is not None:
                _stop(proc, timeout=30)


def _start_cluster(tmp_path: Path, head_cpus: int) -> tuple[str, subprocess.Popen, subprocess.Popen]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = ray_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={head_cpus}",
                     "--include-dashboard=false"], tmp_path / "head.log")
    time.sleep(3)
    worker = ray_node([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1"], tmp_path / "worker.log")
    wait_nodes(address, 2)
    return address, head, worker


def _run_and_lose_node(job: Path, address: str, worker: subprocess.Popen, tmp_path: Path,
                       *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    """`reembed run` on the cluster; once an actor on ``worker``'s node has written its first shard (its
    marker's pid is one of that node's processes), the node is SIGKILLed, every process of it at once."""
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    cmd = [*reembed_cli(), "run", str(job), "--json", "--progress", "log", "--set", f"runtime.ray_address={address}",
           "--set", f"output.uri={tmp_path / 'vectors'}", "--set", f"index.path={tmp_path / 'qdrant'}", *extra]
    with out.open("w") as stdout, err.open("w") as stderr:
        run = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
        lost_after = None
        deadline = time.monotonic() + 600
        while run.poll() is None and time.monotonic() < deadline:
            if lost_after is None:
                node_pids = set(process_tree(worker.pid))
                for marker in (tmp_path / "vectors").glob("*/shards/*.json"):
                    try:
                        pid = json.loads(marker.read_text()).get("pid")
                    except (OSError, ValueError):  # being replaced
                        continue
                    if pid in node_pids:
                        kill_node(worker)
                        lost_after = marker.stem
                        break
            time.sleep(0.2)
        if run.poll() is None:
            run.kill()
        run.wait()
    assert lost_after is not None, "no shard was written on the second node: " + err.read_text()[-3000:]
    return subprocess.CompletedProcess(cmd, run.returncode, out.read_text(), err.read_text()), lost_after


def test_losing_a_node_mid_run_retries_its_shards_on_the_others(local_reference, tmp_path: Path) -> None:
    """A worker node disappears (SIGKILL to all its processes, a spot machine reclaimed) after its first shard:
    the shard it was working on is retried on the node left, and the run ends as a clean run does."""
    address, head, worker = _start_cluster(tmp_path, head_cpus=1)
    try:
        res, _ = _run_and_lose_node(local_reference["folder"] / "job.yaml", address, worker, tmp_path,
                                             "--set", "runtime.shard_rows=25")
        assert res.returncode == 0, res.stderr[-4000:]
        summary = last_json(res.stdout)
        clean = local_reference["summary"]
        assert summary["points"] == summary["indexed"] == summary["input_rows"] == clean["input_rows"] == N_DOCS
        assert summary["duplicates"] == 0 and summary["quarantined"] == 0 and summary["shards_failed"] == 0
        assert summary["shards_total"] == summary["shards_embedded"] == 8
        assert summary["actors_lost"] == 1 and summary["actors"] == 2
        assert summary["shards_retried"]  # the shard in flight on the lost node (or the one it was returning)
        assert "lost mid-run" in res.stderr and all(s in res.stderr for s in summary["shards_retried"])
        _assert_same_vectors(_vectors(VectorStore(str(tmp_path / "vectors"), summary["collection"])),
                             local_reference["vectors"])
    finally:
        for proc in (worker, head):
            if proc.poll() is None:
                _stop(proc, timeout=30)


def test_no_node_left_for_the_actors_stops_the_run_and_a_rerun_resumes(local_reference, tmp_path: Path) -> None:
    """The only node that can hold an actor is lost and no other has room (the head advertises no CPU): the
    run stops with one line that says so; once a node joins again, a re-run completes what is left, with
    nothing lost or duplicated."""
    address, head, worker = _start_cluster(tmp_path, head_cpus=0)
    second = None
    try:
        job = local_reference["folder"] / "job.yaml"
        res, _ = _run_and_lose_node(job, address, worker, tmp_path, "--set", "runtime.shard_rows=25",
                                    "--set", "runtime.ray_init_timeout=15")
        assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-4000:]
        (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert "no embedding actor is left" in line and "no live Ray node has room" in line, line
        assert "an actor needs 1 CPU" in line and "Re-run the job" in line and "Traceback" not in res.stderr
        second = ray_node([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1"],
                          tmp_path / "second.log")
        wait_nodes(address, 2)
        again = run_cli("run", str(job), "--json", "--set", f"runtime.ray_address={address}",
                        "--set", "runtime.shard_rows=25", "--set", f"output.uri={tmp_path / 'vectors'}",
                        "--set", f"index.path={tmp_path / 'qdrant'}")
        assert again.returncode == 0, again.stderr[-4000:]
        summary = last_json(again.stdout)
        assert summary["mode"] == "resume" and summary["shards_embedded"] < 8
        assert summary["points"] == summary["indexed"] == summary["input_rows"] == N_DOCS
        assert summary["duplicates"] == 0 and summary["vector_rows"] == N_DOCS
        _assert_same_vectors(_vectors(VectorStore(str(tmp_path / "vectors"), summary["collection"])),
                             local_reference["vectors"])
    finally:
        for proc in (second, worker, head):
            if proc is not None and proc.poll() is None:
                _stop(proc, timeout=30)


def test_gpu_actor_cpus_from_the_clusters_nodes(ray_session) -> None:
    """GPU actors take CPUs for their tokenizer threads: the leanest live GPU node's CPUs per actor, minus one.

    This cluster has no GPU, so GPU nodes are this node's own ``ray.nodes()`` entry with GPUs added."""
    from reembed.flows.ray_pool import gpu_actor_cpus

    nodes = ray_session.nodes()
    assert gpu_actor_cpus(nodes, 1) == 1  # no GPU node: the minimum

    def gpu_node(cpus: float, gpus: float, alive: bool = True) -> dict:
        node = {**nodes[0], "Alive": alive}
        node["Resources"] = {**nodes[0]["Resources"], "CPU": cpus, "GPU": gpus}
        return node

    assert gpu_actor_cpus([gpu_node(16, 1)], 1) == 15
    assert gpu_actor_cpus([gpu_node(96, 1)], 1) == 16  # capped
    assert gpu_actor_cpus([gpu_node(16, 1)], 0.25) == 3  # four actors share the node
    assert gpu_actor_cpus([gpu_node(64, 8), gpu_node(12, 2)], 1) == 5  # the leanest node decides
    assert gpu_actor_cpus([gpu_node(64, 8), gpu_node(2, 2, alive=False)], 1) == 7

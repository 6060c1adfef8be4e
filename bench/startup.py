"""Where the seconds before the first document go, and how long a run with nothing to do takes.

Runs the real ``reembed run`` on the shipped sample job (fresh output folders) as a user would, three times:
a first run, a no-op re-run, and a ``reembed plan``; reads the phases from the run's own timestamped log
lines and prints one JSON object:

- ``import_s``: interpreter start to the CLI's first line of work (imports of the CLI and the flow);
- ``prefect_s``: until Prefect's flow run begins (its temporary server starts here when no PREFECT_API_URL);
- ``ray_and_actors_s``: the flow's own ``startup_s`` (Ray start plus actors loading the model);
- ``first_run_s`` / ``noop_s`` / ``plan_s``: wall time of each command.

    .venv/bin/python bench/startup.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample" / "job.yaml"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _run(args: list[str], env: dict[str, str], required: bool = True) -> tuple[float, float | None, str, str]:
    start_wall = time.time()
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "reembed.flows.cli", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=900)
    if res.returncode != 0:
        if required:
            raise SystemExit(f"reembed {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        return start_wall, None, res.stdout, res.stderr  # e.g. `plan` on a version that predates it
    return start_wall, time.perf_counter() - start, res.stdout, res.stderr


def _first(stderr: str, needle: str) -> float | None:
    for line in stderr.splitlines():
        match = _STAMP.match(line)
        if match and needle in line:
            return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="reembed-startup-"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PREFECT_HOME": str(out / "prefect")}
    sets = ["--set", f"output.uri={out / 'vectors'}", "--set", f"index.path={out / 'qdrant'}"]
    t0, first_s, stdout, stderr = _run(["run", str(SAMPLE), *sets, "--json", "-v"], env)
    summary = json.loads(stdout.strip().splitlines()[-1])
    planned = _first(stderr, "planned ")  # first line the flow writes: imports and Prefect are behind it
    begun = _first(stderr, "Beginning flow run")
    _, noop_s, noop_out, _ = _run(["run", str(SAMPLE), *sets, "--json"], env)
    _, plan_s, _, _ = _run(["plan", str(SAMPLE), *sets, "--json"], env, required=False)
    result = {
        "first_run_s": round(first_s, 2),
        "to_flow_start_s": round(begun - t0, 2) if begun else None,
        "to_plan_s": round(planned - t0, 2) if planned else None,
        "ray_and_actors_s": summary.get("startup_s"),
        "flow_seconds": summary.get("seconds"),
        "noop_s": round(noop_s, 2),
        "noop_status": json.loads(noop_out.strip().splitlines()[-1]).get("status"),
        "plan_s": round(plan_s, 2) if plan_s is not None else None,
    }
    if not args.json:
        print(f"first run {result['first_run_s']} s: flow starts at {result['to_flow_start_s']} s (imports, "
              f"Prefect), Ray + actors {result['ray_and_actors_s']} s; no-op re-run {result['noop_s']} s "
              f"({result['noop_status']}); plan {result['plan_s']} s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

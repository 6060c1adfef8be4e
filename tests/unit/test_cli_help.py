"""`--help` on every command explains it and names every option's environment twin."""

from __future__ import annotations

from conftest import run_cli


def test_help_on_every_command() -> None:
    from reembed.flows.cli import cli

    commands = sorted(cli.commands)
    assert {"run", "plan", "search", "status", "eval", "versions", "rollback", "reindex", "deploy", "undeploy",
            "deployments", "worker", "serve"} <= set(commands)
    for args in ([], *([c] for c in commands)):
        res = run_cli(*args, "--help")
        assert res.returncode == 0, res.stderr
        assert "Usage:" in res.stdout
        if args:  # every option of every command names its environment twin
            assert "env var: REEMBED_" in " ".join(res.stdout.split()), args  # help may wrap it
    assert "REEMBED_SEARCH_K" in run_cli("search", "--help").stdout

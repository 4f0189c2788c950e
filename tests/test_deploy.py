"""deploy/: the compose file validates without a Docker engine (Debian's docker-compose
parses and schema-checks it), every command in it and in the systemd units is a valid
echonode command line, the units pass ``systemd-analyze verify``, and the production
config example loads with default deny, TLS, PostgreSQL, Redis and no demo model."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from echonode.cli import build_parser
from echonode.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _parses(argv: list[str]) -> None:
    """The argv is accepted by echonode's own parser (no SystemExit)."""
    args = build_parser().parse_args(argv)
    assert getattr(args, "func", None), argv


def _tool(name: str) -> str:
    """The validator's path; missing it fails (`tests/setup.sh` installs it), never skips silently."""
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} not installed (Debian package; tests/setup.sh installs it)")
    return exe


def _compose_config() -> dict:
    exe = _tool("docker-compose")
    env = {**os.environ, "POSTGRES_PASSWORD": "test-only-password"}
    out = subprocess.run([exe, "-f", str(DEPLOY / "compose.yaml"), "--profile", "demo", "config"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    import yaml
    return yaml.safe_load(out.stdout)


def test_compose_validates_and_commands_parse():
    cfg = _compose_config()
    services = cfg["services"]
    assert {"node", "worker-gpu", "worker-deliver", "redis", "postgres", "orthanc"} <= set(services)
    assert services["orthanc"].get("profiles") == ["demo"], "Orthanc is an optional demo PACS"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    for name in ("node", "worker-gpu", "worker-deliver"):
        svc = services[name]
        _parses(list(svc["command"]))
        env = {k: str(v) for k, v in svc["environment"].items() if k.startswith("ECHONODE_") and k != "ECHONODE_CONFIG"}
        s = load_settings(env=env)        # every variable names a real setting
        assert s.queue.broker_url.startswith("redis://")
        assert s.db_url.startswith("postgresql+psycopg2://")
        assert s.queue.embedded_worker is False
    assert "--device" in services["worker-gpu"]["command"] and "cuda:0" in services["worker-gpu"]["command"]
    assert services["worker-gpu"]["command"][services["worker-gpu"]["command"].index("--queues") + 1] == "analyze"


def test_compose_requires_a_database_password():
    exe = _tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    out = subprocess.run([exe, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode != 0 and "POSTGRES_PASSWORD" in out.stderr


def test_compose_schema_rejects_a_broken_file(tmp_path):
    """The validator can fail: a misspelt key is refused."""
    exe = _tool("docker-compose")
    bad = tmp_path / "compose.yaml"
    bad.write_text((DEPLOY / "compose.yaml").read_text().replace("    restart: unless-stopped\n    command: [\"serve\"",
                                                                   "    restartt: unless-stopped\n    command: [\"serve\"", 1))
    assert "restartt" in bad.read_text()
    out = subprocess.run([exe, "-f", str(bad), "config", "-q"], capture_output=True, text=True,
                         env={**os.environ, "POSTGRES_PASSWORD": "x"}, timeout=60)
    assert out.returncode != 0 and "restartt" in out.stderr


def test_production_config_example():
    s = load_settings(DEPLOY / "echonode.production.toml", env={})
    assert s.node.allow_any_calling_ae is False and s.node.allowed, "default deny with an explicit allow-list"
    assert all(p.hosts for p in s.node.allowed), "each allowed AE is bound to its addresses"
    assert s.node.tls.enabled and s.node.tls.require_client_cert and s.node.tls.ca
    assert s.db_url.startswith("postgresql")
    assert s.broker.startswith("redis://") and s.queue.embedded_worker is False
    assert s.queue.visibility_timeout_s >= 3600
    assert s.model.allow_demo_model is False
    assert s.delivery.destinations and all(d.tls.enabled for d in s.delivery.destinations)


def _units(tmp_path) -> list[Path]:
    exe = shutil.which("echonode") or sys.executable
    out = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        text = unit.read_text().replace("/opt/echonode/venv/bin/echonode", exe)
        name = unit.name.replace("@.service", "@0.service")
        (tmp_path / name).write_text(text.replace("%i", "0") if "@" in unit.name else text)
        out.append(tmp_path / name)
    return out


def test_systemd_units(tmp_path):
    units = _units(tmp_path)
    assert {u.name for u in units} >= {"echonode.service", "echonode-worker@0.service", "echonode-deliver.service"}
    for unit in (DEPLOY / "systemd").glob("*.service"):
        m = re.search(r"^ExecStart=(\S+)\s+(.*)$", unit.read_text(), re.M)
        assert m and m.group(1).endswith("/echonode")
        _parses(shlex.split(m.group(2).replace("%i", "0")))
    out = subprocess.run([_tool("systemd-analyze"), "verify", "--man=no", *map(str, units)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_dockerfiles():
    ci = (ROOT / "tests" / "setup.sh").read_text()   # what CI and the README install
    torch_pin = re.search(r"torch==([\d.]+)", ci).group(1)
    for name, cmd in (("Dockerfile.cpu", ["serve"]), ("Dockerfile.cuda", ["worker", "--queues", "analyze",
                                                                           "--device", "cuda:0"])):
        text = (DEPLOY / name).read_text()
        assert re.search(r"^FROM \S+", text, re.M)
        assert re.search(r"^USER echonode$", text, re.M), "never run the node as root"
        assert f"ARG TORCH_VERSION={torch_pin}" in text, "same torch as CI"
        m = re.search(r"^CMD (\[.*\])$", text, re.M)
        import json
        assert json.loads(m.group(1)) == cmd
        _parses(cmd)

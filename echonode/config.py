"""One typed settings object for the whole node.

Settings come from, in increasing priority:

1. the defaults below (embedded: SQLite and local broker under ``data_dir``),
2. a TOML file (``--config FILE`` or ``ECHONODE_CONFIG``),
3. environment variables ``ECHONODE_<SECTION>__<KEY>`` (double underscore between
   section and key, e.g. ``ECHONODE_NODE__PORT=104``) or ``ECHONODE_<KEY>`` for
   top-level keys (e.g. ``ECHONODE_DATA_DIR``).

The object is built once by the CLI and passed down; no module reads a global.
Every section is a frozen dataclass; unknown keys are an error that names the key,
so a typo in a hospital's config file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


#: values of ``node.on_conflict``
ON_CONFLICT = ("replace", "keep-first")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class AllowedPeer:
    """A calling AE title allowed to associate, optionally bound to host addresses."""

    ae_title: str
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSSettings:
    """Mutual DICOM TLS (PS3.15 B.1 / B.9). Off unless ``cert`` and ``key`` are given."""

    enabled: bool = False
    cert: str = ""
    key: str = ""
    ca: str = ""  # trusted CA bundle for peer certificates; required for mutual TLS
    require_client_cert: bool = True
    # inbound only: the TLS handshake runs in the connection's own thread and must finish
    # within this many seconds (an idle or slow TLS peer never holds the listener)
    handshake_timeout_s: float = 10.0


@dataclass(frozen=True)
class NodeSettings:
    """The DICOM SCP: who we are and whom we accept."""

    ae_title: str = "ECHONODE"
    host: str = "0.0.0.0"
    port: int = 11112
    # Calling AE allow-list. Empty + allow_any_calling_ae=True accepts any AE (the
    # embedded default for a laptop); the production example config denies by default.
    allow_any_calling_ae: bool = True
    allowed: tuple[AllowedPeer, ...] = ()
    require_called_ae: bool = True
    max_associations: int = 16
    min_free_mb: int = 1024  # below this C-STORE answers 0xA700 Out of Resources
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 30.0
    acse_timeout_s: float = 30.0
    max_pdu: int = 1048576  # our maximum receive PDU (bytes); 0 = unlimited (most SCUs then fall back to 16 KiB)
    # a TCP connection that sends no A-ASSOCIATE-RQ within this many seconds is closed
    request_timeout_s: float = 5.0
    # one received instance (file meta + dataset) larger than this is answered 0xA700;
    # sized for long uncompressed echo clips (e.g. 800x600 RGB x 600 frames = 864 MB)
    max_instance_mb: int = 2048
    # Deflated Explicit VR Little Endian input: inflated size may be at most this many
    # times the compressed size (and at most max_instance_mb); beyond it 0xC210
    max_inflate_ratio: int = 200
    # a different object with an already stored SOP Instance UID: both versions are kept on
    # disk and in the index; "replace" makes the newer one current, "keep-first" the first
    on_conflict: str = "replace"
    tls: TLSSettings = field(default_factory=TLSSettings)

    @property
    def is_open(self) -> bool:
        """Any calling AE from anywhere, without TLS (the laptop default, like storescp)."""
        return self.allow_any_calling_ae and not self.allowed and not self.tls.enabled


OPEN_NODE_WARNING = ("open node: any calling AE from any host may store here, without TLS; "
                     "configure node.allowed (AE titles, hosts) or node.tls before connecting to a hospital network")


@dataclass(frozen=True)
class SelectSettings:
    """Which instances are A4C clips worth analysing."""

    # Regular expressions (case-insensitive) matched against SeriesDescription,
    # ImageComments, ProtocolName and similar free-text attributes.
    # The text is bounded first (white space runs collapsed to one space, at most 1 KiB), so
    # `\s?` is enough between words. Each pattern is checked at load
    # (echonode.dicom.select.check_text_pattern): no repeat inside a repeat, no
    # back-reference, at most about one unbounded repeat, so peer text cannot make it backtrack.
    a4c_text_patterns: tuple[str, ...] = (r"\bA4C\b", r"\bAP(ICAL)?\s?4", r"4\s?-?\s?CH(AMBER)?", r"\b4CH\b")
    skip_text_patterns: tuple[str, ...] = (r"\bA2C\b", r"\bPLAX\b", r"\bPSAX\b", r"\bA3C\b", r"\bA5C\b", r"SUBCOSTAL", r"\bSSN\b",
                                      r"\bPS\s?LAX\b", r"\bPS\s?SAX\b", r"PARASTERNAL", r"\bA2CH\b", r"\bA3CH\b")
    # What to do with cine clips that carry no view information: "analyse" or "skip".
    unknown_view_policy: str = "analyse"
    min_frames: int = 2

    def __post_init__(self) -> None:
        from echonode.dicom.select import check_text_pattern  # the matcher owns its safety rules

        for key in ("a4c_text_patterns", "skip_text_patterns"):
            for i, pattern in enumerate(getattr(self, key)):
                try:
                    check_text_pattern(pattern)
                except ValueError as exc:
                    raise ConfigError(f"select.{key}[{i}] {pattern!r}: {exc}") from None
        if self.unknown_view_policy not in ("analyse", "skip"):
            raise ConfigError(f"select.unknown_view_policy: expected 'analyse' or 'skip', got {self.unknown_view_policy!r}")
        if self.min_frames < 1:
            raise ConfigError(f"select.min_frames: expected at least 1, got {self.min_frames}")


@dataclass(frozen=True)
class StableSettings:
    """When a study counts as complete."""

    delay_s: float = 60.0
    poll_s: float = 2.0


@dataclass(frozen=True)
class ModelSettings:
    """Where the EchoCLIP bundles live and how inference runs."""

    models_dir: str = ""  # default: <data_dir>/models
    clip_model: str = "echo-clip"  # bundle name under models_dir, or an absolute path
    r_model: str = "echo-clip-r"
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16
    channel_order: str = "bgr"  # bgr reproduces the published reference pipeline
    sector_mask: bool = False
    frames: int = 20  # frames 0,2,...,38 as in the reference
    frame_stride: int = 2
    promptcam_tasks: tuple[str, ...] = ("pacemaker", "impella", "tavr", "mitraclip")
    promptcam_cine: bool = False  # also a multi-frame SC of every analysed frame with its map
    tasks_file: str = ""  # site overrides of the task catalogue (TOML)
    # Use the tiny phantom-trained demo model when no EchoCLIP weights are installed. Off by
    # default: a hospital node must never send demo results into its PACS silently; only
    # `echonode demo` (or an explicit `model.allow_demo_model = true`) turns it on.
    allow_demo_model: bool = False


WEB_AUTH_KINDS = ("none", "bearer", "basic")


def _check_web(where: str, url: str, auth: str, token: str, username: str) -> None:
    """The DICOMweb fields shared by priors sources and delivery destinations."""
    if not url.startswith(("https://", "http://")):
        raise ConfigError(f"{where}.url: expected an http(s):// base URL, got {url!r}")
    if auth not in WEB_AUTH_KINDS:
        raise ConfigError(f"{where}.auth: expected one of {', '.join(WEB_AUTH_KINDS)}, got {auth!r}")
    if auth == "bearer" and not token:
        raise ConfigError(f"{where}.token: required with auth = 'bearer'")
    if auth == "basic" and not username:
        raise ConfigError(f"{where}.username: required with auth = 'basic'")


@dataclass(frozen=True)
class Destination:
    """A PACS (or viewer) that receives our SR and Secondary Capture objects.

    ``kind = "dimse"`` (default): C-STORE to ``ae_title@host:port``. ``kind = "dicomweb"``:
    STOW-RS to ``url`` (the DICOMweb base, e.g. ``https://pacs/dicom-web``) with ``auth``
    none | bearer (``token``) | basic (``username``/``password``); TLS is verified against
    the system CAs or ``ca_file``.
    """

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    kind: str = "dimse"
    url: str = ""
    auth: str = "none"
    token: str = ""
    username: str = ""
    password: str = ""
    ca_file: str = ""
    timeout_s: float = 60.0
    calling_ae: str = ""  # default: node.ae_title
    storage_commitment: bool = False
    tls: TLSSettings = field(default_factory=TLSSettings)
    # SHA-256 of the PACS certificate (hex, colons allowed, as `openssl x509 -fingerprint
    # -sha256` prints it). Optional; checked on top of the CA chain and host name/IP check.
    tls_pin_sha256: str = ""

    def __post_init__(self) -> None:
        where = f"delivery.destinations[name={self.name!r}]"
        if self.kind not in ("dimse", "dicomweb"):
            raise ConfigError(f"{where}.kind: expected 'dimse' or 'dicomweb', got {self.kind!r}")
        if self.kind == "dicomweb":
            _check_web(where, self.url, self.auth, self.token, self.username)
            if self.storage_commitment:
                raise ConfigError(f"{where}.storage_commitment: DIMSE only (STOW-RS answers per instance)")
        elif not self.ae_title or not self.host or not self.port:
            raise ConfigError(f"{where}: ae_title, host and port are required for kind = 'dimse'")
        pin = self.tls_pin_sha256.strip().replace(":", "").lower()
        if pin:
            if len(pin) != 64 or any(ch not in "0123456789abcdef" for ch in pin):
                raise ConfigError(f"{where}.tls_pin_sha256: expected 64 hex digits (SHA-256), "
                                  f"got {len(pin)} characters")
            if not self.tls.enabled:
                raise ConfigError(f"{where}.tls_pin_sha256 needs {where.split('[')[0]}.tls.enabled = true")
        object.__setattr__(self, "tls_pin_sha256", pin)  # one canonical form for the comparison


@dataclass(frozen=True)
class DeliverySettings:
    destinations: tuple[Destination, ...] = ()
    # A failing row is retried with exponential backoff (backoff_initial_s doubling up to
    # backoff_max_s) until it has been failing for retry_for_s (default one day: a PACS
    # outage of a day loses nothing); max_attempts > 0 adds a bound by count (0: none).
    max_attempts: int = 0
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 600.0
    retry_for_s: float = 86400.0
    commitment_timeout_s: float = 60.0
    # /healthz, `echonode status` and the metrics report trouble while an outbox row is
    # dead or the oldest undelivered object is older than this
    alert_after_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("backoff_initial_s", "backoff_max_s", "retry_for_s", "alert_after_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"delivery.{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.max_attempts < 0:
            raise ConfigError(f"delivery.max_attempts: must be >= 0, got {self.max_attempts!r}")
        if self.max_attempts == 0 and self.retry_for_s == 0:
            raise ConfigError("delivery.retry_for_s: 0 together with delivery.max_attempts = 0 would retry forever; "
                              "set one of them")

    def retry_policy(self) -> dict:
        """The keyword arguments of :func:`echonode.store.outbox.mark_failed`."""
        return {"max_attempts": self.max_attempts, "backoff_initial_s": self.backoff_initial_s,
                "backoff_max_s": self.backoff_max_s, "retry_for_s": self.retry_for_s}


@dataclass(frozen=True)
class PriorSource:
    """A PACS asked for a patient's earlier echo studies (``[[priors.sources]]``).

    ``kind = "dimse"``: C-FIND (Study Root) at ``ae_title@host:port``, retrieve by C-GET
    (``retrieve = "get"``) or C-MOVE to ``move_destination`` (default ``node.ae_title``:
    the moved instances arrive through the node's own C-STORE SCP; the PACS must know
    that AE). A refused C-MOVE falls back to C-GET. ``kind = "dicomweb"``: QIDO-RS and
    WADO-RS at ``url`` with ``auth`` as for DICOMweb destinations.
    """

    name: str
    kind: str = "dimse"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    calling_ae: str = ""  # default: node.ae_title
    retrieve: str = "get"
    move_destination: str = ""  # default: node.ae_title
    url: str = ""
    auth: str = "none"
    token: str = ""
    username: str = ""
    password: str = ""
    ca_file: str = ""
    timeout_s: float = 30.0  # one network operation (association, response, HTTP read)
    # Send IssuerOfPatientID as a matching key (true), or only ask for it back and let the
    # node drop other issuers' studies (false: for a PACS that ignores or mishandles the key).
    # The node checks the issuer of every answer and every retrieved header either way.
    match_issuer_at_pacs: bool = True
    frames: bool = True  # DICOMweb: WADO-RS frame retrieval of only the frames the model uses, when offered

    def __post_init__(self) -> None:
        where = f"priors.sources[name={self.name!r}]"
        if self.kind not in ("dimse", "dicomweb"):
            raise ConfigError(f"{where}.kind: expected 'dimse' or 'dicomweb', got {self.kind!r}")
        if self.kind == "dicomweb":
            _check_web(where, self.url, self.auth, self.token, self.username)
        else:
            if not self.ae_title or not self.host or not self.port:
                raise ConfigError(f"{where}: ae_title, host and port are required for kind = 'dimse'")
            if self.retrieve not in ("get", "move"):
                raise ConfigError(f"{where}.retrieve: expected 'get' or 'move', got {self.retrieve!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"{where}.timeout_s: expected a positive number of seconds")


@dataclass(frozen=True)
class PriorsSettings:
    """Earlier studies of the patient from the PACS (echonode.priors, docs/priors.md)."""

    enabled: bool = False
    sources: tuple[PriorSource, ...] = ()
    timeout_s: float = 120.0   # the whole wait of one analysis for its priors
    keep_pixels: bool = False  # keep retrieved prior instances under <data_dir>/priors
    max_studies: int = 5       # newest earlier studies used per patient
    max_results: int = 500     # C-FIND / QIDO answers read per query, at most
    max_instances: int = 200   # instances listed per prior study, at most
    max_clips: int = 4         # A4C clips retrieved per prior study
    max_bytes: int = 2 * 1024 ** 3  # one retrieved instance (WADO-RS part, C-GET file), at most
    backfill_concurrency: int = 2   # concurrent retrieves of `echonode priors backfill`

    def __post_init__(self) -> None:
        for key in ("timeout_s",):
            if getattr(self, key) <= 0:
                raise ConfigError(f"priors.{key}: expected a positive number")
        for key in ("max_studies", "max_results", "max_instances", "max_clips", "max_bytes", "backfill_concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(f"priors.{key}: expected at least 1")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError("priors.sources: source names must be unique")


@dataclass(frozen=True)
class QueueSettings:
    """Celery. Empty broker_url = the embedded broker on local storage."""

    broker_url: str = ""
    result_backend: str = ""
    visibility_timeout_s: int = 7200
    embedded_worker: bool = True  # `echonode serve` starts a worker itself
    embedded_worker_device: str = ""  # default: model.device
    # A running job whose worker stopped heart-beating for lease_s is re-queued (or failed
    # after max_attempts worker losses): kill -9 / OOM of a worker loses no study.
    lease_s: float = 120.0
    heartbeat_s: float = 10.0
    max_attempts: int = 3
    # A job that meets a transient failure (database or broker unreachable) goes back to
    # the queue with backoff (retry_backoff_s doubling up to retry_backoff_max_s) and
    # fails only once it has been failing for retry_for_s.
    retry_for_s: float = 3600.0
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("retry_for_s", "retry_backoff_s", "retry_backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"queue.{name}: must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9112


@dataclass(frozen=True)
class ResultsSettings:
    """Which result objects go into the study besides the SR, the overlays and the page."""

    pdf: bool = False  # the key-results page also as an Encapsulated PDF


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail (PS3.15 A.5 over syslog). Events are always kept in SQL; with ``url``
    set they are also sent to that audit record repository."""

    url: str = ""  # "udp://host:514" | "tcp://host:514" | "tls://host:6514"; empty = SQL only
    ca: str = ""    # CA bundle that signed the repository's certificate (tls)
    cert: str = ""  # our client certificate (tls, mutual authentication)
    key: str = ""
    source_id: str = ""           # AuditSourceID; default "<node.ae_title>@<hostname>"
    enterprise_site_id: str = ""  # AuditEnterpriseSiteID
    poll_s: float = 1.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.url:
            from echonode.audit.syslog import AuditURLError, parse_url
            try:
                ep = parse_url(self.url)
            except AuditURLError as exc:
                raise ConfigError(f"audit.url: {exc}") from None
            if ep.scheme != "tls" and (self.cert or self.key):
                raise ConfigError("audit.cert/audit.key are only used with a tls:// audit.url")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("audit.cert and audit.key go together")
        for name in ("poll_s", "retry_initial_s", "retry_max_s", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"audit.{name} must be > 0")


@dataclass(frozen=True)
class StorageSettings:
    """Where instances, results and quarantine live. Empty ``url``: the data directory.
    ``s3://bucket/prefix``: S3-compatible object storage, written through (docs/scale-out.md).
    Credentials never come from this file: ``access_key_file``/``secret_key_file`` or the
    environment variables ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``."""

    url: str = ""
    endpoint: str = ""     # http(s)://host:port of an S3-compatible server; empty = AWS
    region: str = "us-east-1"
    access_key_file: str = ""
    secret_key_file: str = ""
    ca: str = ""           # CA bundle for an https endpoint with a private CA
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        import re
        from urllib.parse import urlsplit

        if self.url:
            if not self.url.startswith("s3://"):
                raise ConfigError(f"storage.url: must be empty (the data directory) or s3://bucket/prefix, got {self.url!r}")
            bucket, _, prefix = self.url[len("s3://"):].partition("/")
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ConfigError(f"storage.url: {bucket!r} is not an S3 bucket name")
            if prefix.strip("/") and not re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", prefix.strip("/")):
                raise ConfigError(f"storage.url: prefix {prefix!r} may hold only letters, digits, '.', '_', '-' and '/'")
        if self.endpoint:
            u = urlsplit(self.endpoint)
            if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
                raise ConfigError("storage.endpoint: must be http(s)://host[:port] without credentials")
        if bool(self.access_key_file) != bool(self.secret_key_file):
            raise ConfigError("storage.access_key_file and storage.secret_key_file go together")
        if not self.timeout_s > 0:
            raise ConfigError(f"storage.timeout_s: must be positive, got {self.timeout_s!r}")


#: keys that would put a credential in clear in the config file
_SECRET_KEYS = ("access_key", "secret_key", "access_key_id", "secret_access_key", "aws_access_key_id",
                "aws_secret_access_key", "password", "session_token")


@dataclass(frozen=True)
class Settings:
    data_dir: str = "./echonode-data"
    database_url: str = ""  # default: sqlite:///<data_dir>/echonode.sqlite3
    log_level: str = "INFO"
    node: NodeSettings = field(default_factory=NodeSettings)
    select: SelectSettings = field(default_factory=SelectSettings)
    stable: StableSettings = field(default_factory=StableSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    results: ResultsSettings = field(default_factory=ResultsSettings)
    priors: PriorsSettings = field(default_factory=PriorsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)

    # ---- derived paths (never stored, always computed from data_dir) ----
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def storage_path(self) -> Path:
        return self.data_path / "instances"

    @property
    def quarantine_path(self) -> Path:
        return self.data_path / "quarantine"

    @property
    def results_path(self) -> Path:
        return self.data_path / "results"

    @property
    def models_path(self) -> Path:
        return Path(self.model.models_dir).expanduser().resolve() if self.model.models_dir else self.data_path / "models"

    @property
    def priors_path(self) -> Path:
        return self.data_path / "priors"

    @property
    def cache_path(self) -> Path:
        return self.data_path / "cache"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'echonode.sqlite3'}"

    @property
    def broker(self) -> str:
        return self.queue.broker_url or f"sqla+sqlite:///{self.data_path / 'broker.sqlite3'}"

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- loading

def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _env_tree(env: Mapping[str, str]) -> dict:
    tree: dict = {}
    for name, value in env.items():
        if not name.startswith("ECHONODE_") or name == "ECHONODE_CONFIG":
            continue
        path = name[len("ECHONODE_"):].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def load_settings(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build Settings from defaults, an optional TOML file, the environment and overrides."""
    env = os.environ if env is None else env
    data: dict = {}
    path = path or env.get("ECHONODE_CONFIG") or None
    if path:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        # relative data_dir in a file is relative to the file
        if "data_dir" in data and not Path(str(data["data_dir"])).is_absolute():
            data["data_dir"] = str((p.parent / str(data["data_dir"])).resolve())
    for key in _SECRET_KEYS:
        if isinstance(data.get("storage"), Mapping) and key in data["storage"]:
            raise ConfigError(f"storage.{key}: credentials are never read from the config file; use "
                              "storage.access_key_file/secret_key_file or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    data = _merge(data, _env_tree(env))
    if overrides:
        data = _merge(data, overrides)
    settings = _build(Settings, data, "")
    validate_node(settings.node)
    return settings


_AE_BAD = set("\\") | {chr(c) for c in range(32)} | {chr(127)}


def _valid_hostname(name: str) -> bool:
    """RFC 1123 host name syntax (resolution happens per association and fails closed)."""
    if not name or len(name) > 253:
        return False
    labels = name.rstrip(".").split(".")
    return all(0 < len(lab) <= 63 and lab[0] != "-" and lab[-1] != "-"
               and all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in lab) for lab in labels)


def validate_node(node: NodeSettings) -> None:
    """Checks of ``[node]`` that typing alone cannot express (ConfigError naming the key)."""
    import ipaddress

    for i, peer in enumerate(node.allowed):
        where = f"node.allowed[{i}]"
        ae = peer.ae_title.strip()
        if not ae or len(ae) > 16 or any(ch in _AE_BAD or not ch.isascii() for ch in peer.ae_title):
            raise ConfigError(f"{where}.ae_title: {peer.ae_title!r} is not a valid AE title (1-16 ASCII characters, no backslash or control characters)")
        for j, host in enumerate(peer.hosts):
            h = host.strip()
            ok = False
            try:
                ipaddress.ip_network(h, strict=False)
                ok = True
            except ValueError:
                ok = _valid_hostname(h) and not h.replace(".", "").isdigit()
            if not ok or h != host:
                raise ConfigError(f"{where}.hosts[{j}]: {host!r} is neither an IP address, a network (CIDR) nor a host name")
    for key in ("max_associations", "max_instance_mb", "max_inflate_ratio"):
        if getattr(node, key) < 1:
            raise ConfigError(f"node.{key}: must be at least 1, got {getattr(node, key)!r}")
    if node.max_pdu < 0 or (0 < node.max_pdu < 4096) or node.max_pdu > 64 * 1024 * 1024:
        raise ConfigError(f"node.max_pdu: must be 0 (unlimited) or 4096..67108864, got {node.max_pdu!r}")
    for key in ("request_timeout_s", "dimse_timeout_s", "network_timeout_s", "acse_timeout_s"):
        if not getattr(node, key) > 0:
            raise ConfigError(f"node.{key}: must be a positive number of seconds, got {getattr(node, key)!r}")
    if node.on_conflict not in ON_CONFLICT:
        raise ConfigError(f"node.on_conflict: must be one of {', '.join(ON_CONFLICT)}, got {node.on_conflict!r}")
    if not node.tls.handshake_timeout_s > 0:
        raise ConfigError(f"node.tls.handshake_timeout_s: must be positive, got {node.tls.handshake_timeout_s!r}")


"""Where the node's bytes live: received instances, results, quarantine.

Two backends behind one interface, chosen by ``storage.url``:

* ``""`` (default): the local data directory (:class:`LocalStorage`). A key is a path
  relative to ``data_dir``; an object is durable once its file is fsynced and linked in
  place and its directory fsynced.
* ``s3://bucket/prefix``: S3-compatible object storage (:class:`S3Storage`). A key is an
  object name under the prefix; an object is durable once the PUT is acknowledged.

The invariant both keep (docs/scale-out.md): the node answers a C-STORE with Success only
when the instance is durable in the configured store AND its SQL row is committed. With
S3 that is write-through: the received temp file is PUT before the row commits; if the
store cannot be reached the cart gets 0xA700 and sends again later. Nothing is
acknowledged that lives only on one machine's disk, so receivers and workers keep no
state of their own and any of them can be lost.

Keys are built by the node from validated UIDs and fixed words, never from free text;
:func:`check_key` refuses anything else before a key touches a path or a URL.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, ContextManager, Iterator, NamedTuple, Optional

if TYPE_CHECKING:
    from echonode.config import Settings

__all__ = ["Storage", "StorageUnavailable", "StoredObject", "check_key", "describe", "open_checked", "open_storage", "INSTANCES",
           "RESULTS", "QUARANTINE"]

INSTANCES = "instances"
RESULTS = "results"
QUARANTINE = "quarantine"

# one component: UIDs, hex names, timestamps and the node's own words; no "..", no "/"
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StorageUnavailable(OSError):
    """The store did not take or give an object (network, server, credentials). Transient:
    a C-STORE is answered 0xA700, a worker re-queues, a delivery retries."""


class StoredObject(NamedTuple):
    key: str
    size: int
    mtime: float  # seconds since the epoch


def check_key(key: str) -> str:
    """``key`` if it is a relative key of safe components (at most 8), else ValueError."""
    parts = str(key).split("/")
    if not key or len(parts) > 8 or not all(_COMPONENT.fullmatch(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"not a storage key: {str(key)[:80]!r}")
    return key


class Storage:
    """The interface. Every method raises :class:`StorageUnavailable` when the store
    cannot be reached; ``FileExistsError``/``FileNotFoundError`` keep their meaning."""

    kind = "abstract"
    #: the spool must fsync its temp file before :meth:`put_new` (local links the file itself)
    needs_synced_source = False

    def put_new(self, key: str, src: Path, sha256: str) -> Optional[Callable[[], None]]:
        """Store ``src``'s bytes at ``key`` unless an object is there (``FileExistsError``).
        Returns ``None`` when the object is durable already, or a ``wait()`` to call before
        relying on it (local: directory fsyncs run meanwhile)."""
        raise NotImplementedError

    def put(self, key: str, src: Path, *, move: bool = False) -> None:
        """Store ``src`` at ``key``, replacing what is there; durable on return. For objects
        whose bytes are a function of the key (results: same UIDs, same content) and for
        names never used twice (quarantine). ``move``: ``src`` is gone afterwards (local:
        renamed, same file system)."""
        raise NotImplementedError

    def write(self, key: str, write: Callable[[BinaryIO], None]) -> None:
        """Store what ``write(fh)`` writes at ``key``, atomically, replacing what is there;
        durable on return."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        self.write(key, lambda fh: fh.write(data))

    def sha256(self, key: str) -> Optional[str]:
        """SHA-256 of the stored bytes, ``None`` when there is no object."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> Optional[int]:
        """Bytes of the object, ``None`` when there is none."""
        raise NotImplementedError

    def fetch(self, key: str) -> ContextManager[Path]:
        """A local file holding the object, for the duration of the ``with`` block."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix/``."""
        raise NotImplementedError

    def check(self) -> None:
        """At a process's start: raise when the store cannot be used as configured."""

    def clean_stale(self) -> int:
        """At a process's start: remove temp copies that dead processes left; how many."""
        return 0

    def local_path(self, key: str) -> Optional[Path]:
        """The file of ``key`` when objects are local files (local backend), else ``None``."""
        return None


def describe(settings: "Settings") -> str:
    """Where objects go, for logs and ``status`` (never a credential; no connection made)."""
    st = settings.storage
    if not st.url:
        return f"local directory {settings.data_path}"
    return f"{st.url} at {st.endpoint}" if st.endpoint else st.url


_OPEN: dict = {}
_OPEN_LOCK = threading.Lock()


def open_storage(settings: "Settings") -> Storage:
    """The store ``settings.storage`` names. One per process and configuration: an S3
    client keeps its connection pool, and is safe to share between threads."""
    st = settings.storage
    key = (st, str(settings.data_path))
    with _OPEN_LOCK:
        store = _OPEN.get(key)
        if store is None:
            if not st.url:
                from echonode.storage.local import LocalStorage
                store = LocalStorage(settings.data_path)
            else:
                from echonode.storage.s3 import S3Storage
                store = S3Storage.from_settings(settings)
            _OPEN[key] = store
        return store


def open_checked(settings: "Settings") -> Storage:
    """:func:`open_storage`, checked at a process's start: a bucket that does not exist or
    credentials the store refuses are a configuration error (``ConfigError``: exit 3); a
    store that is down only delays (C-STOREs get 0xA700, jobs and deliveries retry)."""
    import logging

    from echonode.config import ConfigError

    log = logging.getLogger("echonode.storage")
    try:
        store = open_storage(settings)
        store.clean_stale()   # copies of instances a killed process left behind
        store.check()
    except StorageUnavailable as exc:
        log.warning("%s; instances are refused (0xA700) and jobs wait until it answers", exc)
        return open_storage(settings)
    except ValueError as exc:   # storage.s3.StorageConfigError
        raise ConfigError(f"storage: {exc}") from None
    log.info("storage: %s", describe(settings))
    return store

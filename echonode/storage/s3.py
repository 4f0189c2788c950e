"""S3-compatible object storage (AWS S3, SeaweedFS, MinIO, Ceph RGW, ...).

Write-through: :meth:`S3Storage.put_new` returns once the PUT is acknowledged, and it is
a conditional PUT (``If-None-Match: *``), so an acknowledged object is never overwritten,
whichever receiver sends the same SOP Instance UID next. Each object carries the SHA-256
of its bytes as user metadata (``x-amz-meta-sha256``): a receiver that finds a key taken
compares that, without downloading the object.

Credentials never come from the config file: ``storage.access_key_file`` and
``storage.secret_key_file`` (e.g. mounted secrets), else the standard environment
variables ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Optional

from echonode.files import create_new, ensure_dir
from echonode.storage import Storage, StorageUnavailable, StoredObject, check_key

if TYPE_CHECKING:
    from echonode.config import Settings

LOG = logging.getLogger("echonode.storage")
_CHUNK = 1 << 20


class StorageConfigError(ValueError):
    """The bucket does not exist or the credentials are refused: an operator must act."""


def _read_secret(path: str, what: str) -> str:
    try:
        value = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise StorageConfigError(f"storage.{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise StorageConfigError(f"storage.{what}: {path} is empty")
    return value


class S3Storage(Storage):
    kind = "s3"
    needs_synced_source = False  # the PUT's acknowledgement is the durability

    def __init__(self, bucket: str, prefix: str, *, endpoint: str = "", region: str = "us-east-1",
                 access_key: Optional[str] = None, secret_key: Optional[str] = None, ca: str = "",
                 tmp_dir: Path, timeout_s: float = 30.0):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint = endpoint
        self.tmp_dir = Path(tmp_dir)
        cfg = Config(connect_timeout=min(timeout_s, 10.0), read_timeout=timeout_s,
                     retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"},
                     # AWS's newer default CRC32 trailers are not understood by every S3 server
                     request_checksum_calculation="when_required", response_checksum_validation="when_required")
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                        region_name=region or "us-east-1")
        self.client = session.client("s3", endpoint_url=endpoint or None, config=cfg, verify=ca or None)

    @classmethod
    def from_settings(cls, settings: "Settings") -> "S3Storage":
        st = settings.storage
        bucket, _, prefix = st.url[len("s3://"):].partition("/")
        access = _read_secret(st.access_key_file, "access_key_file") if st.access_key_file else None
        secret = _read_secret(st.secret_key_file, "secret_key_file") if st.secret_key_file else None
        return cls(bucket, prefix, endpoint=st.endpoint, region=st.region, access_key=access, secret_key=secret,
                   ca=st.ca, tmp_dir=settings.data_path / ".fetch", timeout_s=st.timeout_s)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # ------------------------------------------------------------------ errors
    @staticmethod
    def _code(exc: Exception) -> str:
        resp = getattr(exc, "response", None) or {}
        return str(resp.get("Error", {}).get("Code", "")) or str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))

    _REFUSED = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")

    def _fail(self, exc: Exception, what: str) -> Exception:
        """Every failure of the store while running is transient (0xA700, re-queue, retry),
        refusals included: a key rotated or a policy changed is fixed by an operator, and
        nothing acknowledged may be dropped meanwhile. Only :meth:`check` at start turns a
        refusal into a configuration error."""
        from botocore.exceptions import ClientError

        code = self._code(exc) if isinstance(exc, ClientError) else ""
        verb = "refused" if code in self._REFUSED else "unavailable"
        return StorageUnavailable(f"object store {verb} ({what}): {type(exc).__name__}{' ' + code if code else ''}")

    @staticmethod
    def _local(exc: OSError) -> bool:
        """An error of the local file (read the source, write the copy), not of the store:
        botocore's timeouts, TLS and proxy errors subclass OSError too (through its vendored
        requests exceptions), and those are the store's, so transient."""
        from botocore.exceptions import BotoCoreError

        return not isinstance(exc, BotoCoreError)

    def clean_stale(self) -> int:
        """Remove temp copies left by processes that died (kill -9 in a fetch): each name
        starts with its process id, so a running process's copies are never touched, even
        when several workers share the data directory. Returns how many were removed."""
        removed = 0
        if not self.tmp_dir.is_dir():
            return 0
        for p in self.tmp_dir.glob("*.part"):
            pid = p.name.split("-", 1)[0]
            try:
                os.kill(int(pid), 0)
                continue   # alive (or not ours to signal): leave it
            except ProcessLookupError:
                pass
            except (ValueError, PermissionError, OverflowError):
                continue
            p.unlink(missing_ok=True)
            removed += 1
        return removed

    # ------------------------------------------------------------------ interface
    def check(self) -> None:
        """Raises StorageConfigError (operator must act) or StorageUnavailable (try later)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - botocore raises many types
            code = self._code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageConfigError(f"bucket {self.bucket!r} does not exist") from None
            if code in self._REFUSED:
                raise StorageConfigError(f"object store refused the bucket check: {code}") from None
            raise self._fail(exc, "the bucket check") from None

    def put_new(self, key: str, src: Path, sha256: str) -> Optional[Callable[[], None]]:
        name = self._key(key)
        try:
            with open(src, "rb") as fh:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=fh, IfNoneMatch="*",
                                       Metadata={"sha256": sha256}, ContentType="application/dicom")
        except OSError as exc:
            if self._local(exc):
                raise
            raise self._fail(exc, "a PUT") from None
        except Exception as exc:  # noqa: BLE001
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise FileExistsError(key) from None
            raise self._fail(exc, "a PUT") from None
        return None

    def put(self, key: str, src: Path, *, move: bool = False) -> None:
        from echonode.storage.local import file_sha256

        try:
            with open(src, "rb") as fh:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=fh,
                                       Metadata={"sha256": file_sha256(Path(src))})
        except OSError as exc:
            if self._local(exc):
                raise
            raise self._fail(exc, "a PUT") from None
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "a PUT") from None
        if move:
            Path(src).unlink(missing_ok=True)

    def write(self, key: str, write: Callable[[BinaryIO], None]) -> None:
        ensure_dir(self.tmp_dir)
        tmp = self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(12)}.part"
        try:
            with create_new(tmp) as fh:
                write(fh)
            self.put(key, tmp)   # one PUT: readers see the whole object or none
        finally:
            tmp.unlink(missing_ok=True)

    def _head(self, key: str) -> Optional[dict]:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(exc, "a HEAD") from None

    def sha256(self, key: str) -> Optional[str]:
        head = self._head(key)
        if head is None:
            return None
        # an object another tool wrote has no digest: "" never equals a real one
        return str((head.get("Metadata") or {}).get("sha256", ""))

    def size(self, key: str) -> Optional[int]:
        head = self._head(key)
        return None if head is None else int(head.get("ContentLength", 0))

    @contextlib.contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        ensure_dir(self.tmp_dir)
        tmp = self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(12)}.part"
        try:
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as exc:  # noqa: BLE001
                if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                    raise FileNotFoundError(f"no object {key}") from None
                raise self._fail(exc, "a GET") from None
            expected = int(obj.get("ContentLength", -1))
            got = 0
            try:
                with create_new(tmp) as fh:
                    for chunk in obj["Body"].iter_chunks(_CHUNK):
                        got += len(chunk)
                        fh.write(chunk)
            except OSError as exc:
                if self._local(exc):
                    raise
                raise self._fail(exc, "a GET") from None
            except Exception as exc:  # noqa: BLE001 - a connection dropped mid-body
                raise self._fail(exc, "a GET") from None
            if expected >= 0 and got != expected:
                raise StorageUnavailable(f"object store sent {got} of {expected} bytes")
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "a DELETE") from None

    def list(self, prefix: str) -> Iterator[StoredObject]:
        base = self._key(prefix) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for o in page.get("Contents", []) or []:
                    yield StoredObject(o["Key"][strip:], int(o["Size"]), o["LastModified"].timestamp())
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "a LIST") from None

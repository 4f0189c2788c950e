"""``echonode models download``: fetch the published EchoCLIP weights from the Hugging Face Hub.

Needs the optional dependency ``huggingface_hub`` (``pip install 'echonode[hub]'``) and a
machine that is online. Revisions are pinned:

* ``echo-clip-r``: ``mkaichristensen/echo-clip-r`` at commit
  271e00685543ed609f67b2b97c3f81228af1452b ("Add model"); the weights must have sha256
  5212c42f…e1cd.
* ``echo-clip``: ``mkaichristensen/echo-clip`` at the "Add model" commit 2c66a65… — only
  the short hash is known, so the full commit id is looked up in the repository's history
  and recorded in the bundle manifest.

Every downloaded LFS file is hashed and compared with the sha256 the Hub records for it.
The bundle is assembled in a staging directory and renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from echonode.model.bundle import (CONFIG_FILE, PINNED_WEIGHTS_SHA256, TEMPLATE_VOCAB, BundleError, Bundle, _finish,
                                   sha256_file)


@dataclass(frozen=True)
class Published:
    name: str
    repo_id: str
    revision: str          # full commit id, or a short prefix resolved at download time
    architecture: str
    tokenizer_kind: str
    weights: str = "open_clip_pytorch_model.bin"


PUBLISHED = {
    "echo-clip-r": Published("echo-clip-r", "mkaichristensen/echo-clip-r", "271e00685543ed609f67b2b97c3f81228af1452b",
                             "echo-clip-r", "template"),
    "echo-clip": Published("echo-clip", "mkaichristensen/echo-clip", "2c66a65", "echo-clip", "clip-bpe"),
}


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise BundleError("downloading needs huggingface_hub: pip install 'echonode[hub]' "
                          "(or copy the files and use `echonode models import`)") from None
    return huggingface_hub


def _offline_error(exc: BaseException, repo_id: str) -> BundleError:
    return BundleError(f"cannot download {repo_id} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
                       "Is this machine online? Offline, copy open_clip_pytorch_model.bin from an online machine "
                       "and run `echonode models import --name NAME --weights FILE`.")


def download(name: str, dest: str | os.PathLike, *, revision: str | None = None, force: bool = False) -> Bundle:
    """Download published bundle ``name`` into ``dest`` (a new directory) and verify it."""
    if name not in PUBLISHED:
        raise BundleError(f"unknown published model {name!r}; known: {', '.join(PUBLISHED)}")
    pub = PUBLISHED[name]
    hub = _hub()
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()) and not force:
        raise BundleError(f"{dest}: already exists (use --force to replace it)")
    api = hub.HfApi()
    rev = revision or pub.revision
    try:
        if len(rev) < 40:  # short hash: find the full commit id in the history
            commits = api.list_repo_commits(pub.repo_id)
            full = [c.commit_id for c in commits if c.commit_id.startswith(rev)]
            if len(full) != 1:
                raise BundleError(f"{pub.repo_id}: commit {rev} not found (or ambiguous) in the repository history")
            rev = full[0]
        info = api.model_info(pub.repo_id, revision=rev, files_metadata=True)
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - connection, offline mode, HTTP errors
        raise _offline_error(exc, pub.repo_id) from None
    lfs_sha = {s.rfilename: (s.lfs.sha256 if getattr(s, "lfs", None) else None) for s in (info.siblings or [])}
    if pub.weights not in lfs_sha:
        raise BundleError(f"{pub.repo_id}@{rev}: {pub.weights} not found in the repository")
    staging = dest.parent / f".{dest.name}.download"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        for fname in (CONFIG_FILE, pub.weights):
            try:
                got = hub.hf_hub_download(pub.repo_id, fname, revision=rev, local_dir=str(staging))
            except Exception as exc:  # noqa: BLE001
                raise _offline_error(exc, pub.repo_id) from None
            expected = lfs_sha.get(fname)
            if expected:
                digest = sha256_file(got)
                if digest != expected:
                    raise BundleError(f"{got}: sha256 {digest} does not match the Hub's {expected}")
        pinned = PINNED_WEIGHTS_SHA256.get(name)
        if pinned:
            digest = sha256_file(staging / pub.weights)
            if digest != pinned:
                raise BundleError(f"{staging / pub.weights}: sha256 {digest}, expected the published {pinned}")
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub bookkeeping
        if pub.tokenizer_kind == "template":
            from echonode.model.tokenize import TEMPLATE_VOCAB_PATH
            shutil.copyfile(TEMPLATE_VOCAB_PATH, staging / TEMPLATE_VOCAB)
        _finish(staging, name=name, architecture=pub.architecture, tokenizer_kind=pub.tokenizer_kind,
                weights_name=pub.weights, demo=False, source=f"hf-hub:{pub.repo_id}@{rev}",
                extra={"revision": rev, "repo_id": pub.repo_id})
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle.open(dest)

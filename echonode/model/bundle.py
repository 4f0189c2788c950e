"""A model bundle: one directory in the published open_clip layout plus our manifest.

::

    <models_dir>/<name>/
        open_clip_config.json        model_cfg + preprocess_cfg (as on the Hugging Face Hub)
        open_clip_pytorch_model.bin  or open_clip_model.safetensors (open_clip state-dict keys)
        template_vocab.txt           EchoCLIP-R only: the template vocabulary
        tokenizer.json ...           optional, kept as published (not used, see README)
        calibration.json             optional, written by ``echonode calibrate``
        echonode.json                manifest: name, architecture, tokenizer kind, demo flag,
                                     source, sha256 + size of every file above; for a model
                                     echonode trained from scratch also ``value_ranges``
                                     (see :meth:`Bundle.value_range`)

:meth:`Bundle.open` reads the manifest and checks every file's sha256 without loading
weights (hashes are cached in ``.echonode-verified.json`` by size + mtime, so a second
open does not re-read 600 MB); :meth:`Bundle.load_model` loads. A directory without a
manifest (a plain Hub download) is accepted: its weights are hashed and the published
EchoCLIP-R checksum selects the template tokenizer.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from echonode.model.configs import ARCHITECTURES, DATA_DIR, ModelConfig, get_config

log = logging.getLogger(__name__)

MANIFEST = "echonode.json"
CONFIG_FILE = "open_clip_config.json"
TEMPLATE_VOCAB = "template_vocab.txt"
CALIBRATION = "calibration.json"
VERIFY_CACHE = ".echonode-verified.json"
#: open_clip's preference order for the checkpoint in a directory
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                "pytorch_model.bin")
OPTIONAL_FILES = ("tokenizer.json", "merges.txt", "vocab.json", "special_tokens_map.json",
                  "tokenizer_config.json", "README.md")
TOKENIZER_KINDS = ("clip-bpe", "template")
MANIFEST_FORMAT = 1

#: Published weights checksums, pinned by bundle name (research/echoclip.md §2.2).
PINNED_WEIGHTS_SHA256 = {
    "echo-clip-r": "5212c42fab82d4b2dd0a3196058d192bb91bc35c33633bf0ca01cae76d09e1cd",
}

#: Where the tiny phantom-trained demo bundle ships (used when no weights are installed).
DEMO_BUNDLE_DIR = DATA_DIR / "demo-model"


class BundleError(Exception):
    """A bundle is missing, corrupted or inconsistent; the message names the file."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
            if progress is not None:
                progress(len(b))
    return h.hexdigest()


def _hash_with_progress(path: Path, size: int) -> str:
    """sha256 with a progress bar on stderr for large files (weights) when it is a terminal."""
    import sys
    if size < (64 << 20) or not sys.stderr.isatty():
        return sha256_file(path)
    from tqdm import tqdm
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", file=sys.stderr,
              leave=False) as bar:
        return sha256_file(path, progress=bar.update)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def _write_json_atomic(path: Path, data: Any) -> None:
    from echonode.files import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def validate_value_ranges(data: Any, where: str = MANIFEST) -> dict[str, list[int]]:
    """``{task id: [lo, hi]}`` with integers lo <= hi, or :class:`BundleError`."""
    if not isinstance(data, Mapping):
        raise BundleError(f"{where}: 'value_ranges' must be an object of task id -> [lo, hi]")
    out = {}
    for tid, rng in data.items():
        if (not isinstance(rng, (list, tuple)) or len(rng) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng) or rng[0] > rng[1]):
            raise BundleError(f"{where}: value_ranges[{tid!r}] must be [lo, hi] integers with lo <= hi, got {rng!r}")
        out[str(tid)] = [int(rng[0]), int(rng[1])]
    return out


def validate_calibration(data: Mapping[str, Any], where: str = CALIBRATION) -> dict:
    """Check the calibration format of the common contract; returns it as a dict."""
    if not isinstance(data, Mapping):
        raise BundleError(f"{where}: expected an object")
    prov = data.get("provenance")
    if not isinstance(prov, Mapping) or not all(k in prov for k in ("dataset", "date", "n", "tool")):
        raise BundleError(f"{where}: 'provenance' must have dataset, date, n, tool")
    tasks = data.get("tasks", {})
    if not isinstance(tasks, Mapping):
        raise BundleError(f"{where}: 'tasks' must be an object")
    for tid, t in tasks.items():
        if not isinstance(t, Mapping) or not isinstance(t.get("threshold"), (int, float)):
            raise BundleError(f"{where}: tasks.{tid}.threshold must be a number")
    lon = data.get("longitudinal")
    if lon is not None and not isinstance(lon, Mapping):
        raise BundleError(f"{where}: 'longitudinal' must be an object")
    return dict(data)


class _VerifyCache:
    """sha256 per file keyed by (size, mtime_ns), stored beside the files when writable."""

    def __init__(self, root: Path):
        self.path = root / VERIFY_CACHE
        # never write into the installed package (the shipped demo bundle is small anyway)
        self.persist = DATA_DIR not in root.parents and root != DATA_DIR
        try:
            self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def sha256(self, path: Path, use_cache: bool = True) -> str:
        st = path.stat()
        key = path.name
        ent = self.data.get(key)
        if use_cache and isinstance(ent, dict) and ent.get("size") == st.st_size and ent.get("mtime_ns") == st.st_mtime_ns:
            return str(ent.get("sha256"))
        digest = _hash_with_progress(path, st.st_size)
        self.data[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty or not self.persist:
            return
        try:
            _write_json_atomic(self.path, self.data)
        except OSError:  # read-only bundle (e.g. a shipped demo): verification still happened
            pass


@dataclass
class Bundle:
    path: Path
    name: str
    architecture: str
    config: ModelConfig
    weights_path: Path
    weights_sha256: str
    tokenizer_kind: str
    calibration: dict | None = None
    demo: bool = False
    source: str = ""
    template_vocab_path: Path | None = None
    manifest: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        """Read a bundle directory; with ``verify`` check every recorded sha256 (cached)."""
        root = Path(path).expanduser().resolve()
        if not root.is_dir():
            raise BundleError(f"{root}: model bundle directory not found")
        cache = _VerifyCache(root)
        try:
            if (root / MANIFEST).is_file():
                bundle = cls._open_managed(root, verify, cache)
            else:
                bundle = cls._open_plain(root, cache)
        finally:
            cache.save()
        return bundle

    @classmethod
    def _open_managed(cls, root: Path, verify: bool, cache: _VerifyCache) -> "Bundle":
        man = _read_json(root / MANIFEST)
        where = root / MANIFEST
        for key in ("name", "architecture", "tokenizer_kind", "weights", "files"):
            if key not in man:
                raise BundleError(f"{where}: missing key {key!r}")
        files = man["files"]
        if not isinstance(files, dict):
            raise BundleError(f"{where}: 'files' must be an object")
        if man["tokenizer_kind"] not in TOKENIZER_KINDS:
            raise BundleError(f"{where}: tokenizer_kind {man['tokenizer_kind']!r} is not one of {TOKENIZER_KINDS}")
        weights_name = str(man["weights"])
        for required in (CONFIG_FILE, weights_name):
            if required not in files:
                raise BundleError(f"{where}: {required} is not recorded in the manifest")
        for rel in files:
            if rel != Path(rel).name or rel.startswith("."):
                raise BundleError(f"{where}: file entry {rel!r} is not a plain file name")
        if man["tokenizer_kind"] == "template" and TEMPLATE_VOCAB not in files:
            raise BundleError(f"{where}: a template-tokenizer bundle must record {TEMPLATE_VOCAB}")
        for rel, ent in files.items():
            p = root / rel
            if not p.is_file():
                raise BundleError(f"{p}: file missing from the bundle (expected sha256 {ent.get('sha256')})")
            if not verify:
                continue
            size = p.stat().st_size
            if "size" in ent and ent["size"] != size:
                raise BundleError(f"{p}: size {size} bytes, expected {ent['size']} "
                                  f"(sha256 {ent.get('sha256')}); the file is truncated or replaced")
            digest = cache.sha256(p)
            if digest != ent.get("sha256"):
                raise BundleError(f"{p}: sha256 {digest} does not match the expected {ent.get('sha256')}")
        weights_sha = str(files[weights_name]["sha256"])
        name = str(man["name"])
        _check_pin(name, weights_sha, root / weights_name)
        cfg = _read_config(root / CONFIG_FILE, str(man["architecture"]), str(man["tokenizer_kind"]))
        if "value_ranges" in man:
            validate_value_ranges(man["value_ranges"], str(where))
        calibration = None
        cal_path = root / CALIBRATION
        if cal_path.is_file():
            if CALIBRATION not in files:
                log.warning("%s is not recorded in %s; using it unverified", cal_path, MANIFEST)
            calibration = validate_calibration(_read_json(cal_path), str(cal_path))
        return cls(path=root, name=name, architecture=str(man["architecture"]), config=cfg,
                   weights_path=root / weights_name, weights_sha256=weights_sha,
                   tokenizer_kind=str(man["tokenizer_kind"]), calibration=calibration,
                   demo=bool(man.get("demo", False)), source=str(man.get("source", "")),
                   template_vocab_path=(root / TEMPLATE_VOCAB) if TEMPLATE_VOCAB in files else None,
                   manifest=man)

    @classmethod
    def _open_plain(cls, root: Path, cache: _VerifyCache) -> "Bundle":
        """A directory as published on the Hub (config + weights, no manifest)."""
        if not (root / CONFIG_FILE).is_file():
            raise BundleError(f"{root}: neither {MANIFEST} nor {CONFIG_FILE} found; not a model bundle")
        weights = next((root / w for w in WEIGHT_FILES if (root / w).is_file()), None)
        if weights is None:
            raise BundleError(f"{root}: no weights file (expected one of {', '.join(WEIGHT_FILES)})")
        digest = cache.sha256(weights)
        name = root.name
        _check_pin(name, digest, weights)
        is_r = digest == PINNED_WEIGHTS_SHA256["echo-clip-r"] or (root / TEMPLATE_VOCAB).is_file()
        kind = "template" if is_r else "clip-bpe"
        arch = "echo-clip-r" if is_r else "echo-clip"
        cfg = _read_config(root / CONFIG_FILE, arch, kind, strict_arch=False)
        if cfg.name == "custom":
            arch = "custom"
        vocab = root / TEMPLATE_VOCAB if (root / TEMPLATE_VOCAB).is_file() else None
        calibration = None
        if (root / CALIBRATION).is_file():
            calibration = validate_calibration(_read_json(root / CALIBRATION), str(root / CALIBRATION))
        return cls(path=root, name=name, architecture=arch, config=cfg, weights_path=weights,
                   weights_sha256=digest, tokenizer_kind=kind, calibration=calibration, demo=False,
                   source="directory without manifest", template_vocab_path=vocab, manifest={})

    # ------------------------------------------------------------------ use
    def verify(self, full: bool = True) -> dict[str, str]:
        """Re-hash every file (``full`` ignores the cache); returns {file: sha256}."""
        cache = _VerifyCache(self.path)
        out = {}
        files = self.manifest.get("files") or {self.weights_path.name: {"sha256": self.weights_sha256}}
        for rel, ent in files.items():
            p = self.path / rel
            if not p.is_file():
                raise BundleError(f"{p}: file missing from the bundle (expected sha256 {ent.get('sha256')})")
            digest = cache.sha256(p, use_cache=not full)
            if digest != ent.get("sha256"):
                raise BundleError(f"{p}: sha256 {digest} does not match the expected {ent.get('sha256')}")
            out[rel] = digest
        _check_pin(self.name, self.weights_sha256, self.weights_path)
        cache.save()
        return out

    @property
    def value_ranges(self) -> dict[str, list[int]]:
        """{regression task id: [lo, hi]} recorded by ``echonode train`` ({} when none)."""
        return dict(self.manifest.get("value_ranges") or {})

    def value_range(self, task_id: str) -> tuple[int, int] | None:
        """The lowest and highest value of a regression task (LVEF, PASP) that this model's
        training reports stated, recorded by ``echonode train`` for a model trained from
        scratch; None for the published weights (and fine-tunes of them), which read 0-100.

        A text tower reads only numbers it was trained on: candidate prompts with values no
        training report said embed like a generic sentence of the task and crowd the top 20 %
        of the regression ranking (research/echoclip.md §5.2), so the interpreter ranks only
        candidates inside this range."""
        r = self.value_ranges.get(task_id)
        return (int(r[0]), int(r[1])) if r else None

    def load_model(self, device: str = "cpu", precision: str = "fp32"):
        """The CLIP with this bundle's weights, in eval mode (strict key match)."""
        from echonode.model.clip import WeightsError, model_from_state_dict, read_state_dict
        try:
            sd = read_state_dict(self.weights_path)
            return model_from_state_dict(self.config, sd, device=device, precision=precision,
                                         source=str(self.weights_path))
        except WeightsError as exc:
            raise BundleError(str(exc)) from None

    def tokenizer(self):
        """``ClipBPETokenizer`` or ``TemplateTokenizer`` (vocabulary from this bundle)."""
        from echonode.model.tokenize import ClipBPETokenizer, TemplateTokenizer
        if self.tokenizer_kind == "template":
            return TemplateTokenizer(self.template_vocab_path)  # None = the vendored published vocabulary
        return ClipBPETokenizer(context_length=self.config.context_length)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "architecture": self.architecture,
                "tokenizer_kind": self.tokenizer_kind, "demo": self.demo,
                "weights": self.weights_path.name, "weights_sha256": self.weights_sha256,
                "calibrated": self.calibration is not None, "source": self.source,
                "value_ranges": self.value_ranges}


def _check_pin(name: str, digest: str, path: Path) -> None:
    pinned = PINNED_WEIGHTS_SHA256.get(name)
    if pinned and digest != pinned:
        raise BundleError(f"{path}: sha256 {digest} is not the published {name} weights; expected {pinned} "
                          f"(use another bundle name for other weights)")


def _read_config(path: Path, architecture: str, tokenizer_kind: str, strict_arch: bool = True) -> ModelConfig:
    data = _read_json(path)
    try:
        cfg = ModelConfig.from_open_clip_config(data, name=architecture, tokenizer_kind=tokenizer_kind)
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"{path}: {exc}") from None
    if architecture in ARCHITECTURES:
        ref = get_config(architecture)
        same = (ref.embed_dim, ref.vision, ref.text) == (cfg.embed_dim, cfg.vision, cfg.text)
        if not same:
            if strict_arch:
                raise BundleError(f"{path}: model_cfg does not describe architecture {architecture!r} "
                                  f"(expected {json.dumps(ref.to_open_clip_config()['model_cfg'])})")
            cfg = ModelConfig.from_open_clip_config(data, name="custom", tokenizer_kind=tokenizer_kind)
    return cfg


# --------------------------------------------------------------------------- writing

def _prepare_dir(path: Path, overwrite: bool) -> None:
    if path.exists():
        if not path.is_dir():
            raise BundleError(f"{path}: exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise BundleError(f"{path}: directory is not empty (refusing to overwrite a bundle)")
        if overwrite:  # drop the old bundle's files (a calibration belongs to the old weights)
            for name in WEIGHT_FILES + OPTIONAL_FILES + (MANIFEST, CONFIG_FILE, TEMPLATE_VOCAB, CALIBRATION,
                                                         VERIFY_CACHE):
                (path / name).unlink(missing_ok=True)
    from echonode.files import ensure_dir
    ensure_dir(path)


def _finish(path: Path, *, name: str, architecture: str, tokenizer_kind: str, weights_name: str,
            demo: bool, source: str, extra: Mapping[str, Any] | None = None) -> "Bundle":
    from echonode import __version__
    files = {}
    cache = _VerifyCache(path)
    for p in sorted(path.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST:
            files[p.name] = {"sha256": cache.sha256(p, use_cache=False), "size": p.stat().st_size}
    _check_pin(name, files[weights_name]["sha256"], path / weights_name)
    man = {"format": MANIFEST_FORMAT, "name": name, "architecture": architecture,
           "tokenizer_kind": tokenizer_kind, "demo": bool(demo), "weights": weights_name,
           "source": source, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "echonode_version": __version__, "files": files}
    if extra:
        man.update(extra)
    _write_json_atomic(path / MANIFEST, man)
    from echonode.files import restrict
    restrict(path)   # weights copied or downloaded with the umask's modes: a model is the site's data
    cache.save()
    return Bundle.open(path)


def _resolve_config(architecture: str, config: ModelConfig | Mapping | str | os.PathLike | None,
                    tokenizer_kind: str) -> dict:
    if config is None:
        if architecture not in ARCHITECTURES:
            raise BundleError(f"architecture {architecture!r} is not built in; pass its open_clip config")
        return get_config(architecture).to_open_clip_config()
    if isinstance(config, ModelConfig):
        return config.to_open_clip_config()
    if isinstance(config, (str, os.PathLike)):
        data = _read_json(Path(config))
    else:
        data = dict(config)
    try:
        ModelConfig.from_open_clip_config(data, name=architecture, tokenizer_kind=tokenizer_kind)
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"open_clip config: {exc}") from None
    return data


def write_bundle(path: str | os.PathLike, state_dict: Mapping[str, Any], *, name: str, architecture: str,
                 tokenizer_kind: str, template_vocab: str | os.PathLike | None = None, demo: bool = False,
                 config: ModelConfig | Mapping | None = None, weights_format: str = "safetensors",
                 dtype: str | None = None, source: str = "", calibration: Mapping | None = None,
                 value_ranges: Mapping[str, Any] | None = None, overwrite: bool = False) -> Bundle:
    """Write a state dict (open_clip keys) as a bundle and return it opened and verified.

    ``value_ranges`` ({regression task id: [lo, hi]}) records the values the model's training
    reports stated (:meth:`Bundle.value_range`).

    ``weights_format``: ``"safetensors"`` (open_clip_model.safetensors) or ``"bin"``
    (open_clip_pytorch_model.bin, a torch.save'd dict as published). ``dtype="fp16"`` stores
    half-precision weights (the shipped demo model); loading casts to the requested precision.
    For ``tokenizer_kind="template"`` without ``template_vocab`` the published vocabulary is copied.
    """
    import torch

    if tokenizer_kind not in TOKENIZER_KINDS:
        raise BundleError(f"tokenizer_kind must be one of {TOKENIZER_KINDS}, got {tokenizer_kind!r}")
    if weights_format not in ("safetensors", "bin"):
        raise BundleError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    path = Path(path).expanduser().resolve()
    cfg_data = _resolve_config(architecture, config, tokenizer_kind)
    cfg = ModelConfig.from_open_clip_config(cfg_data, name=architecture, tokenizer_kind=tokenizer_kind)
    # fail before writing anything if the weights do not fit the architecture
    from echonode.model.clip import CLIP, WeightsError, load_weights
    with torch.device("meta"):
        probe = CLIP(cfg)
    sd = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    try:
        load_weights(probe, {k: v.to("meta") for k, v in sd.items()}, source="state dict", assign=True)
    except WeightsError as exc:
        raise BundleError(str(exc)) from None
    if dtype:
        target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        sd = {k: (v.to(target) if v.is_floating_point() else v) for k, v in sd.items()}
    sd = {k: v.contiguous().clone() for k, v in sd.items()}  # no shared storage for safetensors
    _prepare_dir(path, overwrite)
    (path / CONFIG_FILE).write_text(json.dumps(cfg_data, indent=2) + "\n", encoding="utf-8")
    if weights_format == "safetensors":
        from safetensors.torch import save_file
        weights_name = "open_clip_model.safetensors"
        save_file(sd, str(path / weights_name), metadata={"format": "pt"})
    else:
        weights_name = "open_clip_pytorch_model.bin"
        torch.save(sd, str(path / weights_name))
    if tokenizer_kind == "template":
        from echonode.model.tokenize import TEMPLATE_VOCAB_PATH, TemplateTokenizer
        src = Path(template_vocab) if template_vocab else TEMPLATE_VOCAB_PATH
        TemplateTokenizer(src)  # must parse
        shutil.copyfile(src, path / TEMPLATE_VOCAB)
    if calibration is not None:
        _write_json_atomic(path / CALIBRATION, validate_calibration(calibration))
    extra = {"value_ranges": validate_value_ranges(value_ranges)} if value_ranges else None
    return _finish(path, name=name, architecture=architecture, tokenizer_kind=tokenizer_kind,
                   weights_name=weights_name, demo=demo, source=source or "echonode write_bundle", extra=extra)


def import_bundle(path: str | os.PathLike, weights: str | os.PathLike, *, name: str,
                  architecture: str | None = None, template_vocab: str | os.PathLike | None = None,
                  config: str | os.PathLike | Mapping | None = None, tokenizer_kind: str | None = None,
                  source: str = "", overwrite: bool = False, check_load: bool = True) -> Bundle:
    """Copy a weights file (``.bin``/``.pth``/``.safetensors``) into a new bundle directory.

    ``weights`` may also be a published folder: its weights file (open_clip's preference
    order), ``open_clip_config.json`` and ``template_vocab.txt`` are used.

    Architecture defaults from the name (``echo-clip-r`` → template tokenizer); the
    weights are key-checked against the architecture (``check_load``) before the manifest
    is written.
    """
    weights = Path(weights).expanduser().resolve()
    if weights.is_dir():  # a published folder (e.g. a Hub download): weights, config, vocabulary
        folder = weights
        found = next((folder / w for w in WEIGHT_FILES if (folder / w).is_file()), None)
        if found is None:
            raise BundleError(f"{folder}: no weights file (expected one of {', '.join(WEIGHT_FILES)})")
        weights = found
        if config is None and (folder / CONFIG_FILE).is_file():
            config = folder / CONFIG_FILE
        if template_vocab is None and (folder / TEMPLATE_VOCAB).is_file():
            template_vocab = folder / TEMPLATE_VOCAB
    if not weights.is_file():
        raise BundleError(f"{weights}: weights file not found")
    if architecture is None:
        architecture = name if name in ARCHITECTURES else "echo-clip"
    if tokenizer_kind is None:
        tokenizer_kind = "template" if (architecture == "echo-clip-r" or template_vocab) else "clip-bpe"
    if tokenizer_kind not in TOKENIZER_KINDS:
        raise BundleError(f"tokenizer_kind must be one of {TOKENIZER_KINDS}, got {tokenizer_kind!r}")
    pinned = PINNED_WEIGHTS_SHA256.get(name)
    if pinned:  # fail before copying 600 MB
        _check_pin(name, sha256_file(weights), weights)
    cfg_data = _resolve_config(architecture, config, tokenizer_kind)
    path = Path(path).expanduser().resolve()
    _prepare_dir(path, overwrite)
    weights_name = "open_clip_model.safetensors" if weights.suffix == ".safetensors" else "open_clip_pytorch_model.bin"
    try:
        (path / CONFIG_FILE).write_text(json.dumps(cfg_data, indent=2) + "\n", encoding="utf-8")
        tmp = path / f".{weights_name}.part"
        shutil.copyfile(weights, tmp)
        os.replace(tmp, path / weights_name)
        if tokenizer_kind == "template":
            from echonode.model.tokenize import TEMPLATE_VOCAB_PATH, TemplateTokenizer
            src = Path(template_vocab) if template_vocab else TEMPLATE_VOCAB_PATH
            TemplateTokenizer(src)
            shutil.copyfile(src, path / TEMPLATE_VOCAB)
        if check_load:
            from echonode.model.clip import WeightsError, read_state_dict, load_weights, CLIP
            import torch
            cfg = ModelConfig.from_open_clip_config(cfg_data, name=architecture, tokenizer_kind=tokenizer_kind)
            with torch.device("meta"):
                probe = CLIP(cfg)
            try:
                sd = read_state_dict(path / weights_name)
                load_weights(probe, {k: v.to("meta") for k, v in sd.items()}, source=str(weights), assign=True)
            except WeightsError as exc:
                raise BundleError(str(exc)) from None
            del sd
        return _finish(path, name=name, architecture=architecture, tokenizer_kind=tokenizer_kind,
                       weights_name=weights_name, demo=False, source=source or f"imported from {weights.name}")
    except BaseException:
        if not overwrite:
            shutil.rmtree(path, ignore_errors=True)
        raise


def write_calibration(bundle_path: str | os.PathLike, calibration: Mapping[str, Any]) -> Path:
    """Write ``calibration.json`` into a bundle and record its sha256 in the manifest."""
    root = Path(bundle_path).expanduser().resolve()
    data = validate_calibration(calibration)
    _write_json_atomic(root / CALIBRATION, data)
    man_path = root / MANIFEST
    if man_path.is_file():
        man = _read_json(man_path)
        p = root / CALIBRATION
        man.setdefault("files", {})[CALIBRATION] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        _write_json_atomic(man_path, man)
    return root / CALIBRATION


# --------------------------------------------------------------------------- lookup

def bundle_dir_for(settings, which: str = "clip") -> Path:
    """The configured directory for ``which`` ("clip" → model.clip_model, "r" → model.r_model)."""
    if which not in ("clip", "r"):
        raise ValueError(f"which must be 'clip' or 'r', got {which!r}")
    name = settings.model.clip_model if which == "clip" else settings.model.r_model
    p = Path(name).expanduser()
    if p.is_absolute() or os.sep in name:
        return p.resolve()
    return settings.models_path / name


def resolve_model(settings, which: str = "clip", verify: bool = True) -> Bundle | None:
    """The bundle configured for ``which``, or None when it is not installed.

    For ``which="clip"`` with ``model.allow_demo_model`` the shipped demo bundle
    (:data:`DEMO_BUNDLE_DIR`) stands in when no weights are installed; its ``demo`` flag
    is set. A bundle that exists but fails verification raises :class:`BundleError`.
    """
    d = bundle_dir_for(settings, which)
    if d.is_dir() and ((d / MANIFEST).is_file() or (d / CONFIG_FILE).is_file()):
        return Bundle.open(d, verify=verify)
    if which == "clip" and settings.model.allow_demo_model and (DEMO_BUNDLE_DIR / MANIFEST).is_file():
        return Bundle.open(DEMO_BUNDLE_DIR, verify=verify)
    return None


def list_bundles(models_path: str | os.PathLike) -> list[Path]:
    root = Path(models_path)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and ((p / MANIFEST).is_file() or (p / CONFIG_FILE).is_file()))

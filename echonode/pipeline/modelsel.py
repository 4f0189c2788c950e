"""Which model bundles the pipeline uses, and what to tell the user when there is none.

Order: the EchoCLIP bundle found by ``echonode.model.bundle.resolve_model(settings)``
(``model.clip_model`` under ``models_dir``, or an absolute path); else, only when
``model.allow_demo_model = true`` (``echonode demo`` sets it; the default is false), the
tiny phantom-trained demo bundle shipped in ``echonode/data/demo-model`` — whose every
output says DEMO MODEL — NOT FOR CLINICAL USE. Otherwise jobs wait in state
``waiting_model`` with :func:`no_model_message`, and run once a model is installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from echonode.config import Settings
from echonode.model.configs import DATA_DIR

log = logging.getLogger("echonode.pipeline")

DEMO_MODEL_DIR = DATA_DIR / "demo-model"


@dataclass(frozen=True)
class ModelChoice:
    clip: Optional[Any]          # Bundle, or None when no model is available
    r: Optional[Any]             # EchoCLIP-R Bundle (longitudinal comparison), optional
    demo: bool
    message: str                 # why there is no model / which model is used

    @property
    def available(self) -> bool:
        return self.clip is not None


def no_model_message(settings: Settings, detail: str = "") -> str:
    try:
        from echonode.model.bundle import bundle_dir_for
        where = bundle_dir_for(settings, "clip")
    except Exception:  # pragma: no cover - a malformed model.clip_model
        where = settings.models_path / settings.model.clip_model
    msg = (f"no EchoCLIP model installed (looked in {where})"
           + (f": {detail}" if detail else "") + ". Analysis jobs wait in state waiting_model and run once "
           "a model is installed: `echonode models import --name echo-clip --weights <published weights file or "
           "folder>` (and --name echo-clip-r for comparison with prior studies), or `echonode models download "
           "echo-clip` on a machine with internet access. "
           "For a demonstration only, set model.allow_demo_model = true "
           "(tiny demo model, DEMO MODEL — NOT FOR CLINICAL USE).")
    return msg


def _resolve(settings: Settings, which: str, verify: bool):
    from echonode.model.bundle import resolve_model
    return resolve_model(settings, which=which, verify=verify)


def choose_models(settings: Settings, *, verify: bool = True) -> ModelChoice:
    """The bundles to use now. Never raises for a missing model; a broken one is reported.

    ``verify=False`` only checks presence (the dispatcher's cheap check); workers verify
    the weights' sha256 (cached by size and mtime) before loading them.
    """
    detail = ""
    try:
        clip = _resolve(settings, "clip", verify)
    except Exception as exc:  # BundleError: a broken bundle must not look like "absent"
        clip, detail = None, f"{type(exc).__name__}: {exc}"
    r = None
    if clip is not None:
        try:
            r = _resolve(settings, "r", verify)
        except Exception as exc:
            log.warning("EchoCLIP-R bundle unusable, longitudinal comparison off: %s", exc)
    if clip is not None and getattr(clip, "demo", False) and not settings.model.allow_demo_model:
        return ModelChoice(None, None, False, no_model_message(
            settings, "the installed bundle is a demo model and model.allow_demo_model is false"))
    if clip is None:
        return ModelChoice(None, None, False, no_model_message(settings, detail))
    demo = bool(getattr(clip, "demo", False))
    msg = (f"DEMO MODEL — NOT FOR CLINICAL USE ({clip.name}, no EchoCLIP weights installed)" if demo else
           f"model {clip.name} ({str(clip.weights_sha256)[:12]})")
    if r is not None:
        msg += f", EchoCLIP-R {r.name} ({str(r.weights_sha256)[:12]})"
    return ModelChoice(clip, r, demo, msg)

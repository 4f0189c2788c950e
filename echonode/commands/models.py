"""``echonode models`` (list / verify / import / download) and ``echonode embed``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from echonode import audit

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def register(sub, parents):
    p = sub.add_parser("models", parents=parents, help="list, verify, import or download EchoCLIP model bundles",
                       description="Model bundles live in <models_dir>/<name>/ (model.models_dir, default "
                                   "<data_dir>/models): open_clip_config.json, the weights, for EchoCLIP-R the "
                                   "template vocabulary, and echonode.json with the sha256 of every file.")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")

    pl = msub.add_parser("list", parents=parents, help="installed bundles and whether they verify")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(func=run_list)

    pv = msub.add_parser("verify", parents=parents, help="re-hash every file of a bundle (all bundles if none given)")
    pv.add_argument("bundle", nargs="?", metavar="DIR|NAME", help="bundle directory or name under models_dir")
    pv.add_argument("--json", action="store_true", help="print JSON")
    pv.set_defaults(func=run_verify)

    pi = msub.add_parser("import", parents=parents, help="make a bundle from a weights file",
                         description="Copy an open_clip checkpoint (.bin/.pth/.safetensors) into "
                                     "<models_dir>/NAME, check its keys against the architecture, hash every "
                                     "file and write the manifest. NAME echo-clip-r requires the published "
                                     "weights (sha256 5212c42f…e1cd).")
    pi.add_argument("--name", required=True, help="bundle name (echo-clip, echo-clip-r, or your own)")
    pi.add_argument("--weights", required=True, metavar="FILE|DIR",
                    help="open_clip_pytorch_model.bin or .safetensors, or a folder holding it (and its "
                         "open_clip_config.json), e.g. a Hugging Face download")
    pi.add_argument("--template-vocab", metavar="FILE",
                    help="EchoCLIP-R template vocabulary (default for template bundles: the published one)")
    pi.add_argument("--model-config", metavar="FILE",
                    help="open_clip_config.json (default: the architecture's config); named --model-config "
                         "because --config is the node's settings file")
    pi.add_argument("--architecture", choices=("echo-clip", "echo-clip-r", "tiny"),
                    help="default: the name if it is one of these, else echo-clip")
    pi.add_argument("--tokenizer", choices=("clip-bpe", "template"),
                    help="default: template for echo-clip-r or when --template-vocab is given, else clip-bpe")
    pi.add_argument("--force", action="store_true", help="replace an existing bundle of that name")
    pi.add_argument("--json", action="store_true", help="print JSON")
    pi.set_defaults(func=run_import)

    pd = msub.add_parser("download", parents=parents, help="fetch published weights from the Hugging Face Hub",
                         description="Needs huggingface_hub (pip install 'echonode[hub]') and network access. "
                                     "Pinned revisions; every file's checksum is verified.")
    pd.add_argument("name", choices=("echo-clip", "echo-clip-r"))
    pd.add_argument("--revision", help="override the pinned commit (expert use)")
    pd.add_argument("--force", action="store_true", help="replace an existing bundle of that name")
    pd.add_argument("--json", action="store_true", help="print JSON")
    pd.set_defaults(func=run_download)
    p.set_defaults(func=lambda args: (p.print_help(), EXIT_USAGE)[1])

    pe = sub.add_parser("embed", parents=parents, help="L2-normalised EchoCLIP embeddings of texts and clips",
                        description="Texts use the bundle's tokenizer (EchoCLIP: CLIP BPE; EchoCLIP-R: template). "
                                    "FILEs (DICOM or AVI/MP4) give one embedding per sampled frame (frames "
                                    "0,2,…,38 unless --all-frames) and the clip mean (the mean of the normalised "
                                    "frame embeddings, not re-normalised, as in the reference).")
    pe.add_argument("files", nargs="*", metavar="FILE", help="DICOM or video files")
    pe.add_argument("--model", metavar="DIR|NAME", help="bundle directory or name (default: model.clip_model)")
    pe.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text to embed (repeatable)")
    pe.add_argument("--all-frames", action="store_true", help="embed every frame instead of 0,2,…,38")
    pe.add_argument("--precision", choices=("fp32", "bf16"), help="default: model.precision")
    pe.add_argument("--device", help="default: model.device")
    pe.add_argument("--channel-order", choices=("bgr", "rgb"), help="default: model.channel_order")
    pe.add_argument("--json", action="store_true", help="print JSON: {texts: [...], files: [...]}")
    pe.set_defaults(func=run_embed)


# --------------------------------------------------------------------------- helpers

def _settings(args):
    from echonode.cli import settings_from_args
    return settings_from_args(args)


def _bundle_path(settings, ref: str) -> Path:
    p = Path(ref).expanduser()
    if p.is_dir() or p.is_absolute() or "/" in ref:
        return p.resolve()
    return settings.models_path / ref


def _err(msg: str) -> None:
    print(f"echonode: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- models

def run_list(args) -> int:
    from echonode.model.bundle import DEMO_BUNDLE_DIR, MANIFEST, Bundle, BundleError, bundle_dir_for, list_bundles

    settings = _settings(args)
    dirs = list_bundles(settings.models_path)
    for which in ("clip", "r"):
        d = bundle_dir_for(settings, which)
        if d.is_dir() and d not in dirs:
            dirs.append(d)
    if settings.model.allow_demo_model and (DEMO_BUNDLE_DIR / MANIFEST).is_file():
        dirs.append(DEMO_BUNDLE_DIR)
    rows = []
    for d in dirs:
        try:
            info = Bundle.open(d).info()
            info["status"] = "ok"
        except BundleError as exc:
            info = {"name": d.name, "path": str(d), "status": f"error: {exc}"}
        rows.append(info)
    if args.json:
        print(json.dumps({"models_dir": str(settings.models_path), "bundles": rows}, indent=2))
        return EXIT_OK
    print(f"models_dir: {settings.models_path}")
    if not rows:
        print("no bundles installed (echonode models import / download)")
    for r in rows:
        if r["status"] == "ok":
            demo = "  DEMO MODEL - NOT FOR CLINICAL USE" if r["demo"] else ""
            ranges = "".join(f"  {k} {v[0]}-{v[1]}" for k, v in sorted(r.get("value_ranges", {}).items()))
            print(f"{r['name']:<16} {r['architecture']:<12} {r['tokenizer_kind']:<9} "
                  f"sha256 {r['weights_sha256'][:12]}…  {r['path']}{demo}{ranges and '  trained values:' + ranges}")
        else:
            print(f"{r['name']:<16} {r['status']}  {r['path']}")
    return EXIT_OK if all(r["status"] == "ok" for r in rows) else EXIT_FAIL


def run_verify(args) -> int:
    from echonode.model.bundle import Bundle, BundleError, list_bundles

    settings = _settings(args)
    targets = [_bundle_path(settings, args.bundle)] if args.bundle else list_bundles(settings.models_path)
    if not targets:
        _err(f"no bundles under {settings.models_path}")
        return EXIT_FAIL
    results, ok = [], True
    for d in targets:
        try:
            b = Bundle.open(d, verify=False)
            files = b.verify(full=True)
            Bundle.open(d)  # manifest consistency after the full re-hash
            results.append({"path": str(d), "name": b.name, "ok": True, "files": files})
            if not args.json:
                print(f"OK    {b.name}: {len(files)} file(s) match their sha256 ({d})")
        except BundleError as exc:
            ok = False
            results.append({"path": str(d), "ok": False, "error": str(exc)})
            if not args.json:
                print(f"FAIL  {d}: {exc}")
    if args.json:
        print(json.dumps({"ok": ok, "bundles": results}, indent=2))
    return EXIT_OK if ok else EXIT_FAIL


def run_import(args) -> int:
    from echonode.model.bundle import BundleError, import_bundle

    settings = _settings(args)
    if "/" in args.name or args.name.startswith(".") or not args.name.strip():
        _err(f"models import: --name must be a plain name, got {args.name!r}")
        return EXIT_USAGE
    dest = settings.models_path / args.name
    try:
        b = import_bundle(dest, args.weights, name=args.name, architecture=args.architecture,
                          template_vocab=args.template_vocab, config=args.model_config,
                          tokenizer_kind=args.tokenizer, overwrite=args.force,
                          source=f"imported from {Path(args.weights).name}")
    except BundleError as exc:
        _err(f"models import: {exc}")
        return EXIT_FAIL
    audit.record(settings, audit.model_installed(b.name, str(b.path), b.weights_sha256, source=Path(args.weights).name, changed=bool(args.force)))
    if args.json:
        print(json.dumps(b.info(), indent=2))
    else:
        print(f"imported {b.name} ({b.architecture}, {b.tokenizer_kind}) into {b.path}; "
              f"weights sha256 {b.weights_sha256}")
    return EXIT_OK


def run_download(args) -> int:
    from echonode.model.bundle import BundleError
    from echonode.model.hub import download

    settings = _settings(args)
    try:
        b = download(args.name, settings.models_path / args.name, revision=args.revision, force=args.force)
    except BundleError as exc:
        _err(f"models download: {exc}")
        return EXIT_FAIL
    audit.record(settings, audit.model_installed(b.name, str(b.path), b.weights_sha256, source=str(b.source), changed=bool(args.force)))
    if args.json:
        print(json.dumps(b.info(), indent=2))
    else:
        print(f"downloaded {b.name} into {b.path}; weights sha256 {b.weights_sha256} ({b.source})")
    return EXIT_OK


# --------------------------------------------------------------------------- embed

def run_embed(args) -> int:
    if not args.text and not args.files:
        _err("embed: give --text TEXT and/or FILE arguments")
        return EXIT_USAGE
    import numpy as np
    import torch
    import torch.nn.functional as F

    from echonode.model.bundle import Bundle, BundleError, resolve_model
    from echonode.model.preprocess import preprocess_frames, sample_indices

    settings = _settings(args)
    try:
        if args.model:
            bundle = Bundle.open(_bundle_path(settings, args.model))
        else:
            bundle = resolve_model(settings, "clip")
            if bundle is None:
                _err(f"embed: no model installed under {settings.models_path} (use --model DIR)")
                return EXIT_FAIL
        model = bundle.load_model(device=args.device or settings.model.device,
                                  precision=args.precision or settings.model.precision)
    except (BundleError, ValueError, RuntimeError) as exc:
        _err(f"embed: {exc}")
        return EXIT_FAIL
    if bundle.demo:
        print("DEMO MODEL — NOT FOR CLINICAL USE", file=sys.stderr)
    device = next(model.parameters()).device
    out = {"model": bundle.info(), "texts": [], "files": []}
    rc = EXIT_OK
    with torch.inference_mode():
        if args.text:
            tok = bundle.tokenizer()
            if bundle.tokenizer_kind == "template":
                for t in args.text:
                    enc = tok.encode(t)
                    if enc.dropped_chars:
                        print(f"echonode: embed: template vocabulary could not represent {enc.dropped_chars} "
                              f"character(s) of {t[:40]!r}…: {enc.dropped_text[:3]}", file=sys.stderr)
            emb = F.normalize(model.encode_text(tok(args.text).to(device)), dim=-1).cpu()
            out["texts"] = [{"text": t, "embedding": e.tolist()} for t, e in zip(args.text, emb)]
        if args.files:
            from echonode.dicom.frames import FrameDecodeError, count_frames, load_clip
            stride = 1 if args.all_frames else settings.model.frame_stride
            limit = None if args.all_frames else settings.model.frames * stride
            order = args.channel_order or settings.model.channel_order
            for f in args.files:
                try:
                    idx = sample_indices(count_frames(f), limit=limit, stride=stride)
                    clip = load_clip(f, idx, sector_mask=settings.model.sector_mask)
                except (FrameDecodeError, OSError, ValueError) as exc:
                    _err(f"embed: {f}: {exc}")
                    rc = EXIT_FAIL
                    continue
                x = preprocess_frames(clip.frames, channel_order=order, size=bundle.config.image_size,
                                      mean=bundle.config.mean, std=bundle.config.std)
                embs = torch.cat([F.normalize(model.encode_image(x[i:i + 16].to(device)), dim=-1).cpu()
                                  for i in range(0, len(x), 16)])
                out["files"].append({"path": str(f), "indices": list(clip.indices), "n_frames": clip.n_frames,
                                     "frames": embs.tolist(), "mean": embs.mean(0).tolist()})
    if args.json:
        print(json.dumps(out))
        return rc
    print(f"model {bundle.name} ({bundle.architecture}, {bundle.tokenizer_kind}), "
          f"weights sha256 {bundle.weights_sha256[:12]}…")
    for t in out["texts"]:
        e = np.asarray(t["embedding"])
        print(f"text  {t['text'][:60]!r}: dim {e.size}, [{', '.join(f'{v:+.3f}' for v in e[:4])}, …]")
    for f in out["files"]:
        m = np.asarray(f["mean"])
        print(f"file  {f['path']}: {len(f['frames'])} frame(s) {f['indices'][:5]}…, mean "
              f"[{', '.join(f'{v:+.3f}' for v in m[:4])}, …]")
        for t in out["texts"]:
            print(f"      cosine(mean, {t['text'][:40]!r}) = {float(m @ np.asarray(t['embedding'])):+.4f}")
    return rc

"""``echonode phantom``: write synthetic A4C studies with known truth as DICOM + manifest."""

from __future__ import annotations

import json
import sys


def register(sub, parents):
    p = sub.add_parser(
        "phantom", parents=parents,
        help="write synthetic apical-4-chamber echo studies (DICOM) with known truth and a manifest",
        description="Write N phantom studies (one Ultrasound Multi-frame A4C clip each, JPEG baseline "
                    "YBR_FULL_422) under --out, plus --out/manifest.csv with report text, patient, "
                    "study date, split and truth columns. Deterministic from --seed.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--studies", type=int, default=20, metavar="N", help="number of studies (default 20)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--split", default="auto", choices=("auto", "train", "val", "test"),
                   help="split column: auto = 80/10/10 by patient (default), or one split for every row")
    p.add_argument("--frames", type=int, default=40, help="frames per clip (default 40)")
    p.add_argument("--size", type=int, default=256, help="rows and columns of each frame (default 256)")
    p.add_argument("--longitudinal", type=float, default=0.3,
                   help="fraction of patients with 2-4 studies months apart (default 0.3)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    from echonode import phantom

    if args.studies < 1 or args.frames < 1 or not (32 <= args.size <= 1024) or not (1 <= args.quality <= 100) \
            or not (0.0 <= args.longitudinal <= 1.0):
        print("echonode phantom: --studies and --frames must be >= 1, --size 32..1024, --quality 1..100, "
              "--longitudinal 0..1", file=sys.stderr)
        return 2
    from tqdm import tqdm
    bar = tqdm(total=args.studies, desc="phantom", unit="study", file=sys.stderr,
               disable=not sys.stderr.isatty())

    def progress(done, total):
        bar.update(1)

    try:
        manifest = phantom.generate_dataset(args.out, args.studies, args.seed, split=args.split,
                                            n_frames=args.frames, rows=args.size, cols=args.size,
                                            longitudinal=args.longitudinal, quality=args.quality,
                                            progress=progress)
    except (OSError, ValueError) as exc:
        print(f"echonode phantom: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"manifest": str(manifest), "studies": args.studies, "seed": args.seed}))
    else:
        print(f"wrote {args.studies} phantom studies; manifest: {manifest}")
    return 0

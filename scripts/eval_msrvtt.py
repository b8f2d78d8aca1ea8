"""MSR-VTT zero-shot CLIPSIM (the paper's Table: Video LDM 0.2929), for a user who has the MSR-VTT test
captions and a CLIP model. Resumable: rerun the same command after an interruption.

    python scripts/eval_msrvtt.py --captions msrvtt_test.csv --checkpoint my_video_ldm --out runs/msrvtt \\
        [--clip openai/clip-vit-base-patch32 --per-video 1 --seed 0]

``--captions``: a CSV with columns ``video_id`` and ``caption`` (MSR-VTT's test split: 2,990 videos with 20
captions each; convert ``test_videodatainfo.json`` with ``--from-json``). ``--per-video``: captions drawn per
test video (seeded; 0 takes them all). Steps: OUT/prompts.txt -> ``vldm sample`` into OUT/samples (with
OUT/samples/captions.csv naming each file's caption) -> ``vldm eval clipsim --captions`` -> OUT/clipsim.json
(the unscaled mean per-frame cosine, the paper's scale). Choose the CLIP model of the reference you compare
with (CLIPSIM tables differ in it; ViT-B/32 is a common choice).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path


def read_captions(path: Path, from_json: bool) -> dict[str, list[str]]:
    by_video: dict[str, list[str]] = {}
    if from_json:  # MSR-VTT's test_videodatainfo.json: {"sentences": [{"video_id", "caption"}, ...]}
        rows = json.loads(path.read_text())["sentences"]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    for r in rows:
        by_video.setdefault(str(r["video_id"]), []).append(r["caption"].strip())
    return by_video


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", required=True)
    p.add_argument("--from-json", action="store_true", help="--captions is MSR-VTT's test_videodatainfo.json")
    p.add_argument("--per-video", type=int, default=1)
    p.add_argument("--clip", default="openai/clip-vit-base-patch32")
    p.add_argument("--checkpoint", default=None, help="Video LDM pipeline folder (default: the bundled model)")
    p.add_argument("--out", required=True)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from vldm_jax.cli import main as vldm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    prompts = []
    for vid, caps in sorted(read_captions(Path(args.captions), args.from_json).items()):
        prompts += caps if args.per_video == 0 else rng.sample(caps, min(args.per_video, len(caps)))
    print(f"{len(prompts)} captions", file=sys.stderr)
    (out / "prompts.txt").write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n")

    sample = ["sample", "--prompts", str(out / "prompts.txt"), "--out", str(out / "samples"), "--format", "mp4",
              "--seed", str(args.seed)]
    for flag, value in (("--checkpoint", args.checkpoint), ("--height", args.height), ("--width", args.width),
                        ("--steps", args.steps)):
        if value is not None:
            sample += [flag, str(value)]
    if vldm(sample) != 0:
        return 1
    return vldm(["eval", "clipsim", str(out / "samples"), "--captions", str(out / "samples" / "captions.csv"),
                 "--clip", args.clip, "--json", str(out / "clipsim.json")])


if __name__ == "__main__":
    sys.exit(main())

"""UCF-101 zero-shot text-to-video FVD (the paper's Table: Video LDM FVD 550.61, IS 33.45), for a user who has
the UCF-101 videos and I3D weights. Every step is resumable; rerun the same command after an interruption.

    python scripts/eval_ucf101.py --ucf101 /data/UCF-101 --i3d i3d_pretrained_400.pt --allow-pickle \\
        --checkpoint my_video_ldm --out runs/ucf101 [--n 10000 --frames 16 --height 320 --width 512]

1. Prompts: the 101 class names split into words (``ApplyEyeMakeup`` -> ``apply eye makeup``); ``--n`` samples
   (10,000 as in the paper) shared among the classes in proportion to their number of videos in the folder
   (uniform with ``--uniform``). Written to OUT/prompts.txt, one line per video to generate.
2. Samples: ``vldm sample`` (skips what exists, atomic files) into OUT/samples at the model's resolution
   (``--height/--width`` to override; the frames are resized to 224 for I3D either way).
3. FVD: ``vldm eval fvd`` of all the real videos (first ``--frames`` frames each; their statistics cached in
   OUT/ucf101_real_stats.npz) against the samples; result in OUT/fvd.json.

IS (the paper's 33.45) needs the C3D network trained on UCF-101 that the TGAN/Make-A-Video protocol uses; it
is not implemented here.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

VIDEO_SUFFIXES = (".avi", ".mp4", ".webm", ".gif", ".mov")


def class_of(path: Path) -> str:
    """UCF-101 names videos ``v_{Class}_g{group}_c{clip}.avi`` (and usually keeps them in class folders)."""
    m = re.match(r"v_([A-Za-z]+)_g\d+_c\d+", path.stem)
    return m.group(1) if m else path.parent.name


def prompt_of(class_name: str) -> str:
    words = re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", class_name)
    return " ".join(w.lower() for w in words)


def allocate(counts: Counter, n: int, uniform: bool = False) -> dict[str, int]:
    """``n`` samples over the classes (largest remainder), proportional to ``counts`` or uniform."""
    classes = sorted(counts)
    weights = {c: (1 if uniform else counts[c]) for c in classes}
    total = sum(weights.values())
    exact = {c: n * weights[c] / total for c in classes}
    out = {c: int(exact[c]) for c in classes}
    for c in sorted(classes, key=lambda c: exact[c] - out[c], reverse=True)[:n - sum(out.values())]:
        out[c] += 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ucf101", required=True, help="folder of UCF-101 videos (class folders or flat)")
    p.add_argument("--i3d", required=True)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--checkpoint", default=None, help="Video LDM pipeline folder (default: the bundled model)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--uniform", action="store_true", help="the same number of samples for every class")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)

    from vldm_jax.cli import main as vldm

    root, out = Path(args.ucf101), Path(args.out)
    videos = sorted(v for v in root.rglob("*") if v.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise SystemExit(f"{root}: no videos")
    counts = Counter(class_of(v) for v in videos)
    print(f"{len(videos)} real videos in {len(counts)} classes", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    lines = [prompt_of(c) for c, k in allocate(counts, args.n, args.uniform).items() for _ in range(k)]
    (out / "prompts.txt").write_text("\n".join(lines) + "\n")

    sample = ["sample", "--prompts", str(out / "prompts.txt"), "--out", str(out / "samples"), "--format", "mp4",
              "--seed", str(args.seed)]
    for flag, value in (("--checkpoint", args.checkpoint), ("--height", args.height), ("--width", args.width),
                        ("--steps", args.steps)):
        if value is not None:
            sample += [flag, str(value)]
    if vldm(sample) != 0:
        return 1

    stats = out / "ucf101_real_stats.npz"
    real = str(stats) if stats.is_file() else str(root)
    fvd = ["eval", "fvd", real, str(out / "samples"), "--i3d", args.i3d, "--frames", str(args.frames),
           "--batch", str(args.batch), "--json", str(out / "fvd.json")]
    if not stats.is_file():
        fvd += ["--save-stats", str(stats)]
    if args.allow_pickle:
        fvd.append("--allow-pickle")
    return vldm(fvd)


if __name__ == "__main__":
    sys.exit(main())

"""Kill harness: SIGKILL writers at random moments and check that nothing half-written carries a final name.

    python scripts/kill_harness.py --kills 60 [--writers image,video,checkpoint,convert,prepare] [--seed 0] \
        [--json out.json]
    python scripts/kill_harness.py --per-writer image=7,video=7,checkpoint=12,convert=12,prepare=12

Each writer runs in a worker subprocess (``--worker NAME DIR``) that loads what it needs once, says READY, then
writes new versions of one result under its final name in a loop, through the production code:

* ``image``: vldm_jax.io.video.write_image (PNG) over an existing image (``--overwrite`` in the CLI);
* ``video``: vldm_jax.io.video.write_video (GIF) over an existing video;
* ``checkpoint``: the training loop's orbax ``Checkpoints`` (asynchronous saves, max_to_keep=2), as ``vldm train``
  saves every ``checkpoint_every`` steps;
* ``convert``: ``save_pretrained`` of the bundled pipeline (``atomic_folder``: what ``vldm convert`` writes) over
  an existing folder;
* ``prepare``: ``prepare_array_record`` (what ``vldm prepare --overwrite`` runs) of a list of 8 GIF clips into 2
  array_record shards + spec.json over an existing prepared folder.

The parent kills the worker after a random delay (uniform over a few write durations, so kills land all over
the write), then checks: the result under the final name is complete and loads (the previous version or a new
complete one), no file under the final name is partial, and a rerun (a fresh worker writing once) completes.
To add a writer (AnimateDiff exports...), add a :class:`Writer` to ``WRITERS``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Writer:
    """One kind of result: ``setup`` (in the worker), ``write(version)`` and ``check() -> version`` (raises when
    the result under the final name is missing, partial or does not load)."""

    name = ""
    period = 0.3  # seconds; kills are drawn uniformly in [0, 3 * period] after READY

    def __init__(self, folder: Path):
        self.folder = folder

    def setup(self) -> None: ...

    def write(self, version: int) -> None: ...

    def check(self) -> int: ...

    def leftovers(self) -> list[str]:
        """Temporary names a killed write may leave (never the final name)."""
        return sorted(p.name for p in self.folder.iterdir() if p.name.startswith("."))


class ImageWriter(Writer):
    name = "image"
    period = 0.15

    def setup(self):
        import numpy as np

        self.np = np
        self.path = self.folder / "out.png"

    def frame(self, version):
        img = self.np.zeros((512, 512, 3), self.np.uint8)
        img[..., 0] = version % 256
        img[..., 1] = self.np.arange(512)[None, :] % 251  # incompressible enough to take a moment
        return img

    def write(self, version):
        from vldm_jax.io.video import write_image

        write_image(self.path, self.frame(version))

    def check(self):
        from vldm_jax.io.video import read_image

        img = read_image(self.folder / "out.png")
        version = int(img[0, 0, 0])
        assert (img == self.frame(version)).all(), "image content does not match any version"
        return version


class VideoWriter(Writer):
    name = "video"
    period = 0.4

    def setup(self):
        import numpy as np

        self.np = np
        self.path = self.folder / "out.gif"

    def frames(self, version):
        v = self.np.zeros((8, 96, 96, 3), self.np.uint8)
        v[..., 0] = version % 256
        v[..., 1] = self.np.arange(8)[:, None, None] * 20  # distinct frames (a GIF merges identical ones)
        return v

    def write(self, version):
        from vldm_jax.io.video import write_video

        write_video(self.path, self.frames(version), fps=8)

    def check(self):
        from vldm_jax.io.video import read_video

        frames, _ = read_video(self.folder / "out.gif")
        assert frames.shape == (8, 96, 96, 3), frames.shape
        version = int(frames[0, 0, 0, 0])
        assert (frames == self.frames(version)).all(), "video content does not match any version"
        return version


class CheckpointWriter(Writer):
    name = "checkpoint"
    period = 0.5

    def setup(self):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from vldm_jax.train.loop import Checkpoints

        self.jax, self.jnp, self.np = jax, jnp, np
        self.ckpt = Checkpoints(self.folder / "checkpoints", keep=2, async_save=True)
        start = self.ckpt.latest_step() or 0
        self.step = start

    def state(self, version):
        return {f"p{i}": self.jnp.full((256, 256), float(version * 10 + i), self.jnp.float32) for i in range(8)}

    def write(self, version):

        self.step += 1
        ocp = self.ckpt.ocp
        args = ocp.args.Composite(state=ocp.args.StandardSave(self.state(version)), meta=ocp.args.JsonSave(
            {"version": version, "step": self.step}))
        self.ckpt.manager.save(self.step, args=args, force=True)  # what Checkpoints.save issues, async
        if version % 2 == 0:
            self.ckpt.wait()

    def finish(self):
        self.ckpt.close()

    def check(self):
        import jax

        from vldm_jax.train.loop import Checkpoints

        ckpt = Checkpoints(self.folder / "checkpoints", keep=2, async_save=False)
        try:
            step = ckpt.latest_step()
            assert step is not None, "no complete checkpoint"
            ocp = ckpt.ocp
            target = {f"p{i}": jax.ShapeDtypeStruct((256, 256), "float32") for i in range(8)}
            restored = ckpt.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            version = int(restored["meta"]["version"])
            for i in range(8):
                assert float(abs(restored["state"][f"p{i}"] - (version * 10 + i)).max()) == 0.0
            return version
        finally:
            ckpt.close()

    def leftovers(self):
        d = self.folder / "checkpoints"
        return sorted(p.name for p in d.iterdir() if not p.name.isdigit()) if d.exists() else []


class ConvertWriter(Writer):
    name = "convert"
    period = 1.0

    def setup(self):
        from vldm_jax.pipelines.text_to_video import TextToVideoPipeline, default_checkpoint

        self.pipe = TextToVideoPipeline.from_pretrained(default_checkpoint(), upsampler=False)
        self.base_defaults = dict(self.pipe.defaults)
        self.dst = self.folder / "converted"

    def write(self, version):
        self.pipe.defaults = {**self.base_defaults, "harness_version": version}
        self.pipe.save_pretrained(self.dst, overwrite=True)

    def check(self):
        from vldm_jax.checkpoints.load import read_safetensors
        from vldm_jax.models.config import read_config_file

        dst = self.folder / "converted"
        index = read_config_file(dst / "model_index.json")
        for part in ("unet", "interpolator", "vae", "text_encoder"):
            read_config_file(dst / part / "vldm_config.json")
            arrays = read_safetensors(dst / part / "params.safetensors")
            assert arrays, f"{part}: no tensors"
            for a in arrays.values():
                a.sum()  # every byte readable
        read_config_file(dst / "scheduler" / "scheduler_config.json")
        return int(index["_vldm_defaults"]["harness_version"])

    def full_load(self):
        from vldm_jax.pipelines.text_to_video import TextToVideoPipeline

        TextToVideoPipeline.from_pretrained(self.folder / "converted", upsampler=False)


class PrepareWriter(Writer):
    name = "prepare"
    period = 0.6
    clips = 8

    def setup(self):
        import numpy as np

        from vldm_jax.io.video import write_video

        self.np = np
        videos = self.folder / "videos"
        if not videos.exists():  # the clips are inputs, written once (by the first worker) before any kill
            staging = self.folder / f".videos-{os.getpid()}"
            staging.mkdir()
            for i in range(self.clips):
                v = np.zeros((12, 64, 64, 3), np.uint8)
                v[..., 0] = i * 30
                v[..., 1] = np.arange(12)[:, None, None] * 20
                write_video(staging / f"clip{i}.gif", v, fps=8)
            os.replace(staging, videos)
        self.out = self.folder / "prepared"

    def write(self, version):
        from vldm_jax.data.array_record import prepare_array_record

        source = self.folder / "videos" / f"list-{os.getpid()}.csv"  # captions carry the version
        source.write_text("path,caption\n" + "".join(f"clip{i}.gif,version {version} clip {i}\n"
                                                     for i in range(self.clips)))
        prepare_array_record(source, self.out, num_frames=8, resolution=32, shards=2, workers=2, overwrite=True,
                             echo=lambda m: None)

    def check(self):
        from vldm_jax.data.array_record import iter_records, read_spec

        spec = read_spec(self.out)
        assert spec["num_examples"] == self.clips and spec["num_skipped"] == 0, spec
        records = list(iter_records(self.out))
        assert len(records) == self.clips, f"{len(records)} records, spec says {self.clips}"
        versions = {int(str(r["caption"]).split()[1]) for r in records}
        assert len(versions) == 1, f"records of several versions: {versions}"
        for r in records:
            assert r["video"].shape == (8, 32, 32, 3), r["video"].shape
        return versions.pop()


WRITERS = {w.name: w for w in (ImageWriter, VideoWriter, CheckpointWriter, ConvertWriter, PrepareWriter)}


# --------------------------------------------------------------------------------------------------- worker

def worker(name: str, folder: Path, once: bool, start_version: int) -> None:
    w = WRITERS[name](folder)
    w.setup()
    print("READY", flush=True)
    version = start_version
    while True:
        w.write(version)
        print(f"WROTE {version}", flush=True)
        version += 1
        if once:
            break
    if hasattr(w, "finish"):
        w.finish()
    print("DONE", flush=True)


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
    return env


def _spawn(name, folder, *, once=False, start_version=1):
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(folder),
            "--start-version", str(start_version)] + (["--once"] if once else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def _wait_for(proc, word, timeout=300.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(word):
            return line
    raise RuntimeError(f"worker did not say {word}: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


def _rerun(name, folder, version):
    """A fresh worker writing one version to completion: the 'rerun completes' check."""
    proc = _spawn(name, folder, once=True, start_version=version)
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0 or "DONE" not in out:
        raise RuntimeError(f"rerun of {name} failed ({proc.returncode}): {err[-2000:]}")


def run_writer(name: str, kills: int, base: Path, rng: random.Random, log=print) -> dict:
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    checker = WRITERS[name](folder)
    checker.setup() if name != "convert" else None
    _rerun(name, folder, 0)  # the previous result every kill must leave intact (or replace whole)
    versions = {0}
    result = {"writer": name, "kills": 0, "intact": 0, "corrupt": 0, "reruns_ok": 0, "landed_mid_write": 0,
              "versions_seen": [], "leftover_temp_names": 0}  # most temporaries present after any one kill
    next_version = 1
    for k in range(kills):
        proc = _spawn(name, folder, start_version=next_version)
        _wait_for(proc, "READY")
        time.sleep(rng.uniform(0.0, 3 * WRITERS[name].period))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        wrote = [int(l.split()[1]) for l in out.splitlines() if l.startswith("WROTE")]
        announced = max(wrote) if wrote else None
        versions.update(wrote)
        result["kills"] += 1
        try:
            found = checker.check()
            # Complete and loadable, and either a version some write finished or the one being written (finished
            # between its rename and its WROTE line): never a mixture.
            ok = found in versions or found == (announced + 1 if announced is not None else next_version)
        except Exception as e:  # noqa: BLE001 - anything here is a corrupt result
            log(f"  {name} kill {k}: CORRUPT: {type(e).__name__}: {e}")
            ok, found = False, None
        result["intact" if ok else "corrupt"] += 1
        result["versions_seen"].append(found)
        result["landed_mid_write"] += 1  # the worker does nothing but write: every kill lands in a write
        result["leftover_temp_names"] = max(result["leftover_temp_names"], len(checker.leftovers()))
        next_version = (announced if announced is not None else next_version) + 2
        versions.add(next_version - 1)  # the version possibly finished without announcing
    _rerun(name, folder, next_version)
    final = checker.check()
    result["reruns_ok"] = int(final == next_version)
    if name == "convert":
        checker.full_load()
    result["final_leftovers"] = checker.leftovers()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=60, help="total kills, spread over the writers")
    p.add_argument("--writers", default=",".join(WRITERS))
    p.add_argument("--per-writer", default=None, metavar="NAME=N,...", help="kills per writer (instead of --kills "
                   "and --writers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the counts here")
    p.add_argument("--worker", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start-version", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args.once, args.start_version)
        return 0
    import tempfile

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    names = [n for n in args.writers.split(",") if n]
    per = [args.kills // len(names) + (i < args.kills % len(names)) for i in range(len(names))]
    if args.per_writer:
        pairs = [item.split("=") for item in args.per_writer.split(",") if item]
        names, per = [n for n, _ in pairs], [int(k) for _, k in pairs]
    unknown = sorted(set(names) - set(WRITERS))
    if unknown:
        p.error(f"unknown writer(s) {unknown}; known: {sorted(WRITERS)}")
    base = Path(args.dir or tempfile.mkdtemp(prefix="vldm_kill_"))
    rng = random.Random(args.seed)
    results = []
    for name, n in zip(names, per):
        t0 = time.perf_counter()
        r = run_writer(name, n, base, rng)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        print(f"{name:11s} kills {r['kills']:3d}  intact {r['intact']:3d}  corrupt {r['corrupt']}  rerun ok "
              f"{r['reruns_ok']}  temp names left (max after a kill) {r['leftover_temp_names']}, after the rerun {len(r['final_leftovers'])}  ({r['seconds']}s)", flush=True)
    total = {k: sum(r[k] for r in results) for k in ("kills", "intact", "corrupt", "reruns_ok")}
    print(f"{'total':11s} kills {total['kills']:3d}  intact {total['intact']:3d}  corrupt {total['corrupt']}  "
          f"reruns ok {total['reruns_ok']}/{len(results)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "total": total}, indent=1))
    return 0 if total["corrupt"] == 0 and total["reruns_ok"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`vldm prepare`: a WebVid-style list of real video files (one corrupt, one too short) -> sharded array_record
files with decoded frames + spec.json; read back by grain per host, shuffled, resumed exactly, without TensorFlow."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vldm_jax.data.array_record import decode_record, encode_record, iter_records, prepare_array_record, read_spec
from vldm_jax.data.frames import resize_center_crop
from vldm_jax.data.grain_pipeline import GrainIterator
from vldm_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
N_GOOD = 7


def write_clips(root: Path, n: int = N_GOOD, frames: int = 8, size=(24, 32)) -> dict[str, np.ndarray]:
    """``n`` real mp4 files (a colour per file, a bar moving over time), their frames as written."""
    from vldm_jax.io.video import write_video

    rng = np.random.default_rng(0)
    written = {}
    for i in range(n):
        video = np.zeros((frames,) + tuple(size) + (3,), np.uint8) + rng.integers(20, 235, 3, dtype=np.uint8)
        for t in range(frames):
            video[t, :, 3 * t:3 * t + 3] = 255
        write_video(root / f"clip{i}.mp4", video, fps=8)
        written[f"clip{i}.mp4"] = video
    return written


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("webvid")
    (root / "videos").mkdir()
    written = write_clips(root / "videos")
    good = (root / "videos" / "clip0.mp4").read_bytes()
    (root / "videos" / "corrupt.mp4").write_bytes(good[: len(good) // 3])  # truncated: no moov atom
    lines = ["path,caption,start,end"] + [f'videos/clip{i}.mp4,"clip {i}, with a comma",,' for i in range(N_GOOD)]
    lines += ["videos/corrupt.mp4,broken,,", "videos/clip1.mp4,too short,0.5,0.75"]
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    notes = []
    spec = prepare_array_record(root / "list.csv", root / "out", num_frames=4, resolution=(16, 16), shards=3,
                                echo=notes.append)
    return root, spec, written, notes


def test_prepare_writes_shards_and_counts_bad_videos(prepared):
    root, spec, written, notes = prepared
    assert spec == read_spec(root / "out")
    assert spec["num_examples"] == N_GOOD and spec["num_skipped"] == 2
    assert {Path(s["file"]).name: s["reason"].split(":")[0] for s in spec["skipped"]} == {
        "corrupt.mp4": "cannot read", "clip1.mp4": "too short"}
    assert sorted(p.name for p in (root / "out").iterdir()) == ["spec.json"] + [
        f"train-0000{i}-of-00003.array_record" for i in range(3)]
    assert any("skipped 2" in n for n in notes) and any("corrupt.mp4" in n for n in notes)
    assert not [p for p in root.iterdir() if p.name.startswith(".out")]  # no temporary folder left

    records = list(iter_records(root / "out"))
    assert sorted(r["caption"] for r in records) == [f"clip {i}, with a comma" for i in range(N_GOOD)]
    for rec in records:
        assert rec["video"].shape == (4, 16, 16, 3) and rec["video"].dtype == np.uint8
        source = written[Path(rec["file"]).name]
        expected = np.stack([resize_center_crop(f, 16, 16) for f in source[:4]]).astype(np.float32)
        assert np.abs(rec["video"].astype(np.float32) - expected).mean() < 6  # h264 is lossy


def test_jsonl_source_and_start_time(tmp_path, prepared):
    root = prepared[0]
    rows = [{"path": str(root / "videos" / "clip2.mp4"), "caption": "late", "start": 0.5},
            {"video": "missing.mp4", "text": "gone"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = prepare_array_record(tmp_path / "list.jsonl", tmp_path / "out", num_frames=2, resolution=16,
                                echo=lambda m: None)
    assert spec["num_examples"] == 1 and spec["skipped"][0]["reason"] == "file not found"
    (rec,) = iter_records(tmp_path / "out")
    # 0.5 s at 8 fps: frames 4 and 5, where the bar is at columns 12 and 15 of 32 (6 and 7.5 of 16).
    bar = rec["video"].astype(np.float32).mean(axis=(1, 3)).argmax(axis=1)
    assert rec["caption"] == "late" and list(bar) in ([6, 7], [6, 8], [7, 8])


def test_errors_are_user_errors(tmp_path, prepared):
    root = prepared[0]
    with pytest.raises(UserError, match="exists"):
        prepare_array_record(root / "list.csv", root / "out", num_frames=4, resolution=16)
    (tmp_path / "bad.csv").write_text(f"{root}/videos/corrupt.mp4,x\n")
    with pytest.raises(UserError, match="no usable clip"):
        prepare_array_record(tmp_path / "bad.csv", tmp_path / "o", num_frames=4, resolution=16, echo=lambda m: None)
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="not found"):
        prepare_array_record(tmp_path / "nope.csv", tmp_path / "o", num_frames=4, resolution=16)
    with pytest.raises(UserError, match="fewer than the global batch"):
        GrainIterator(root / "out", batch_size=4, num_processes=2, process_index=0)
    with pytest.raises(Exception, match="16x16"):
        GrainIterator(root / "out", batch_size=1, num_processes=1, process_index=0, resolution=(32, 32))


def test_record_round_trip():
    ex = {"video": np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3), "caption": "ünïcode, text",
          "latents": np.ones((2, 1, 1, 4), np.float32) * 0.5, "fps": np.float32(4.0)}
    back = decode_record(encode_record(ex))
    assert back["caption"] == ex["caption"] and back["fps"] == 4.0 and back["fps"].shape == ()
    for k in ("video", "latents"):
        assert back[k].dtype == ex[k].dtype and np.array_equal(back[k], ex[k])


def _captions(it, n):
    return [next(it)["caption"] for _ in range(n)]


def test_hosts_split_each_global_batch_and_resume_exactly(prepared):
    out = prepared[0] / "out"
    one = GrainIterator(out, batch_size=2, seed=3, num_processes=1, process_index=0)
    hosts = [GrainIterator(out, batch_size=1, seed=3, num_processes=2, process_index=p) for p in range(2)]
    stream = _captions(one, 9)  # 18 examples: more than two epochs of 7
    per_host = [_captions(h, 9) for h in hosts]
    assert [a + b for a, b in zip(*per_host)] == stream  # each host holds its slice of every global batch
    flat = [c for batch in stream for c in batch]
    assert sorted(flat[:7]) == sorted(flat[7:14]) and flat[:7] != flat[7:14]  # every epoch, each once, reshuffled

    it = GrainIterator(out, batch_size=2, seed=3, num_processes=1, process_index=0)
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.state()))  # what a checkpoint keeps
    rest = [next(it) for _ in range(4)]
    resumed = GrainIterator(out, batch_size=2, seed=3, num_processes=1, process_index=0, state=state)
    again = [next(resumed) for _ in range(4)]
    assert [b["caption"] for b in first + rest] == stream
    for a, b in zip(rest, again):
        assert a["caption"] == b["caption"] and np.array_equal(a["video"], b["video"])
    # One global stream: the same position on two hosts (same global batch) continues it, split between them.
    halves = [GrainIterator(out, batch_size=1, seed=3, num_processes=2, process_index=p, state=state) for p in (0, 1)]
    assert [a + b for a, b in zip(*(_captions(h, 4) for h in halves))] == [b["caption"] for b in rest]
    assert first[0]["video"].dtype == np.uint8 and first[0]["video"].shape == (2, 4, 16, 16, 3)
    assert first[0]["image_only_indicator"].shape == (2, 4) and not first[0]["image_only_indicator"].any()

    window = next(GrainIterator(out, batch_size=2, seed=3, num_processes=1, process_index=0, num_frames=2))
    assert window["video"].shape == (2, 2, 16, 16, 3)


def test_cli_prepare_and_the_trainer_reads_it_without_tensorflow(tmp_path, prepared):
    root = prepared[0]
    cmd = [sys.executable, "-m", "vldm_jax.cli", "prepare", str(root / "list.csv"), "--out", str(tmp_path / "o"),
           "--frames", "4", "--resolution", "16x16", "--shards", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "7 clips, 2 skipped" in proc.stdout and "corrupt.mp4" in proc.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--overwrite" in proc.stderr, proc.stderr

    # The trainer's own data factory picks grain for a prepared folder, and TensorFlow is never imported.
    script = f"""
import sys
from vldm_jax.parallel import mesh as meshlib
from vldm_jax.train.config import load_config
from vldm_jax.train.loop import make_data_iterator
config = load_config(data={{"data": {{"path": {str(tmp_path / 'o')!r}, "num_frames": 4, "height": 16, "width": 16,
                                     "batch_size_per_device": 3}}}})
it = make_data_iterator(config, meshlib.make_mesh(1, 1), None)
batch = next(it)
print(type(it).__name__, batch["video"].shape, "tensorflow" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "GrainIterator (3, 4, 16, 16, 3) False", proc.stdout


@pytest.mark.slow
def test_encode_caches_vae_latents_and_text_embeddings_like_diffusers(tmp_path, prepared):
    """``prepare --encode``: latents and text embeddings stored with each clip match diffusers/transformers run on
    the stored frames and captions (a tiny random SD folder saved with save_pretrained)."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPTokenizer

    from tests.helpers.tiny_sd import make_tiny_sd_pipeline_folder
    from vldm_jax.train.cached_features import pipeline_encoder

    root = prepared[0]
    folder = make_tiny_sd_pipeline_folder(tmp_path)
    (tmp_path / "few.csv").write_text("".join(f'{root}/videos/clip{i}.mp4,"clip {i}, a bar"\n' for i in range(3)))
    encoder, info = pipeline_encoder(folder, batch_size=2)
    spec = prepare_array_record(tmp_path / "few.csv", tmp_path / "out", num_frames=2, resolution=16, encoder=encoder,
                                encode_batch=2, encoded_info=info, echo=lambda m: None)
    assert spec["encoded"]["scaling_factor"] == pytest.approx(0.18215)
    assert spec["features"]["latents"]["shape"] == [2, 8, 8, 4]
    records = list(iter_records(tmp_path / "out"))
    assert len(records) == 3

    import diffusers
    from transformers import CLIPTextModel

    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    with torch.no_grad():
        for rec in records:
            x = torch.from_numpy(rec["video"].astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
            ref = (vae.encode(x).latent_dist.mode() * 0.18215).permute(0, 2, 3, 1).numpy()
            assert np.abs(rec["latents"] - ref).max() < 1e-4
            ids = tok([rec["caption"]], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            ctx = text(ids.input_ids).last_hidden_state[0].numpy()
            assert np.abs(rec["encoder_hidden_states"] - ctx).max() < 1e-4

    batch = next(GrainIterator(tmp_path / "out", batch_size=3, num_processes=1, process_index=0))
    assert batch["latents"].shape == (3, 2, 8, 8, 4) and batch["encoder_hidden_states"].shape == (3, 77, 128)

"""CLIPSIM: the mean over frames (and then over videos) of the cosine similarity between CLIP's image
embedding of each frame and the text embedding of the video's prompt, with our CLIP text and vision encoders.

Reported unscaled (a cosine in [-1, 1]; the paper's MSR-VTT figure 0.2929 is on this scale); ``scale=100``
gives the ×100 convention of CLIPScore-style tables (torchmetrics also clips negatives at 0; we do not).

Frames are preprocessed as transformers' ``CLIPImageProcessor`` does: bicubic resize (PIL) of the shortest
side to the crop size, centre crop, ``/255``, normalise with the folder's image mean and std (OpenAI CLIP's by
default). The per-frame embeddings run sharded over the mesh's data axes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from vldm_jax.errors import UserError
from vldm_jax.eval.features import FeatureExtractor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPFramePreprocess:
    """uint8 ``(F, H, W, 3)`` frames -> float32 ``(F, crop, crop, 3)`` CLIP-normalised (host side, PIL)."""

    def __init__(self, crop_size: int, shortest_edge: int | None = None, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        self.crop = int(crop_size)
        self.short = int(shortest_edge or crop_size)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    @classmethod
    def from_folder(cls, folder: Path, image_size: int) -> "CLIPFramePreprocess":
        cfg_file = folder / "preprocessor_config.json"
        if not cfg_file.exists():
            return cls(image_size)
        cfg = json.loads(cfg_file.read_text())
        size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
        short = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
        crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
        return cls(crop, short, cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        from PIL import Image

        out = []
        for f in np.asarray(frames, np.uint8):
            h, w = f.shape[:2]
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.short * long / short)
            size = (new_long, self.short) if h <= w else (self.short, new_long)  # PIL takes (w, h)
            img = np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC), np.float32)
            hh, ww = img.shape[:2]
            top, left = (hh - self.crop) // 2, (ww - self.crop) // 2
            img = img[top:top + self.crop, left:left + self.crop]
            out.append((img / 255.0 - self.mean) / self.std)
        return np.stack(out).astype(np.float32)


class CLIPSim:
    """``score(videos uint8 (B, F, H, W, 3), prompts) -> (B,)`` per-video CLIPSIM (mean over frames)."""

    def __init__(self, text_model, vision_model, tokenizer, preprocess: CLIPFramePreprocess, *, mesh=None,
                 batch_size: int = 8, scale: float = 1.0):
        self.text_model, self.tokenizer, self.preprocess, self.scale = text_model, tokenizer, preprocess, scale

        def frame_embeds(model, pixels):  # (B, F, S, S, 3) -> (B, F, D), unit length
            b, f = pixels.shape[:2]
            e = model(pixels.reshape(b * f, *pixels.shape[2:])).image_embeds
            e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
            return e.reshape(b, f, -1)

        self.images = FeatureExtractor(vision_model, lambda x: x, fn=frame_embeds, batch_size=batch_size, mesh=mesh)

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        from vldm_jax.models.tokenizer import tokenize

        max_len = self.text_model.config.max_position_embeddings
        ids = jnp.asarray(tokenize(self.tokenizer, list(prompts), max_length=min(77, max_len)))
        e = np.asarray(self.text_model(ids).text_embeds, np.float64)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    def score(self, videos, prompts: Sequence[str]) -> np.ndarray:
        if len(videos) != len(prompts):
            raise UserError(f"{len(videos)} videos but {len(prompts)} prompts")
        pixels = np.stack([self.preprocess(v) for v in videos])
        img = self.images(pixels).astype(np.float64)  # (B, F, D)
        txt = self.text_embeds(prompts)  # (B, D)
        return self.scale * np.einsum("bfd,bd->bf", img, txt).mean(axis=1)


def load_clip(path_or_id: str | os.PathLike, *, allow_pickle: bool = False, mesh=None, batch_size: int = 8,
              scale: float = 1.0) -> CLIPSim:
    """CLIPSIM with a transformers ``CLIPModel`` folder (config.json with text_config and vision_config, its
    weights, tokenizer files and preprocessor_config.json) or hub id (e.g. openai/clip-vit-large-patch14)."""
    from vldm_jax.checkpoints.load import build_from_state_dict, find_folder_weights, resolve_path
    from vldm_jax.models.tokenizer import load_tokenizer

    folder = resolve_path(path_or_id)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{folder}: no config.json of a CLIP model")
    cfg = json.loads(cfg_file.read_text())
    if "text_config" not in cfg or "vision_config" not in cfg:
        raise UserError(f"{folder}: config.json is not a CLIPModel's (needs text_config and vision_config)")
    sd = find_folder_weights(folder, allow_pickle=allow_pickle)
    proj = cfg.get("projection_dim", 512)
    text_sd = {k: v for k, v in sd.items() if k.startswith(("text_model.", "text_projection."))}
    vision_sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    text = build_from_state_dict("CLIPTextModelWithProjection", {**cfg["text_config"], "projection_dim": proj},
                                 text_sd, name="CLIP text")
    vision = build_from_state_dict("CLIPVisionModelWithProjection", {**cfg["vision_config"], "projection_dim": proj},
                                   vision_sd, name="CLIP vision")
    tokenizer = load_tokenizer(folder, pad_token=None)
    pre = CLIPFramePreprocess.from_folder(folder, vision.config.image_size)
    return CLIPSim(text, vision, tokenizer, pre, mesh=mesh, batch_size=batch_size, scale=scale)


def read_prompts(prompts_file: str | os.PathLike | None = None, captions_csv: str | os.PathLike | None = None,
                 ) -> dict[str, str] | list[str]:
    """Prompts from a text file (one a line, in the order of the sorted videos) or a CSV with columns
    ``video`` (file name without or with extension) and ``caption``."""
    if prompts_file:
        p = Path(prompts_file)
        if not p.is_file():
            raise UserError(f"prompts file not found: {p}")
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    import csv

    p = Path(captions_csv)
    if not p.is_file():
        raise UserError(f"captions file not found: {p}")
    with open(p, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"video", "caption"} <= set(rows[0]):
        raise UserError(f"{p}: a captions CSV needs the columns video and caption")
    return {Path(r["video"]).stem: r["caption"] for r in rows}

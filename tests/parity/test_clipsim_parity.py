"""CLIPSIM with our CLIP encoders equals the computation with transformers' CLIPModel and CLIPImageProcessor
on a tiny random CLIPModel folder (save_pretrained, with the tokenizer and preprocessor files)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vldm_jax.errors import UserError  # noqa: E402
from vldm_jax.eval.clipsim import load_clip  # noqa: E402
from vldm_jax.models.tokenizer import load_tokenizer  # noqa: E402

PROMPTS = ["a red circle moving left", "a blue square moving up on a black background"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, eos_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    model = transformers.CLIPModel(cfg).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    tok = load_tokenizer(None)
    tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(folder)
    return model, folder


def reference_clipsim(model, folder, videos, prompts):
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    proc = transformers.CLIPImageProcessor.from_pretrained(str(folder))
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for v, i in zip(videos, ids):
            pix = proc(images=list(v), return_tensors="pt")["pixel_values"]
            o = model(input_ids=i[None].repeat(len(v), 1), pixel_values=pix)
            out.append(torch.nn.functional.cosine_similarity(o.image_embeds, o.text_embeds).mean().item())
    return np.asarray(out)


def test_clipsim_matches_transformers(clip_folder):
    model, folder = clip_folder
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, size=(2, 3, 40, 52, 3), dtype=np.uint8)  # non-square: resize + crop
    clipsim = load_clip(folder, batch_size=2)
    ours = clipsim.score(videos, PROMPTS)
    ref = reference_clipsim(model, folder, videos, PROMPTS)
    print("CLIPSIM ours", ours, "transformers", ref)
    assert np.abs(ours - ref).max() < 1e-4, (ours, ref)
    assert np.abs(load_clip(folder, batch_size=2, scale=100).score(videos, PROMPTS) - 100 * ref).max() < 1e-2
    with pytest.raises(UserError, match="2 videos but 1 prompts"):
        clipsim.score(videos, PROMPTS[:1])

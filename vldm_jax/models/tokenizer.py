"""CLIP tokenizer: a diffusers ``tokenizer/`` folder, or the standard CLIP BPE vocabulary bundled with the package.

The bundled ``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list (MIT licence). The vocabulary
is derived from it the way OpenAI's ``SimpleTokenizer`` does, so ids match every SD 1.x / 2.x / SDXL
tokenizer (they share this vocabulary and differ only in the padding token) without a hub download.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from vldm_jax.errors import CheckpointError

BUNDLED_BPE = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# SD 1.x pads with the end token; SD 2.x (OpenCLIP) tokenizers pad with "!" (id 0).
SD1_PAD_TOKEN = EOS_TOKEN
SD2_PAD_TOKEN = "!"
_NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP: a 49408-token vocabulary = 2 * 256 bytes + merges + 2 specials


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI/GPT-2 byte -> printable character map: printable bytes map to themselves, the rest to 256+n."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, n = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    # Order matters for ids: printable bytes first, then the remapped ones.
    return {b: mapping[b] for b in printable + [b for b in range(256) if b not in printable]}


@functools.lru_cache(maxsize=1)
def bundled_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """The standard CLIP vocabulary (token -> id, 49408 entries) and merge list ("a b" strings, rank order)."""
    data = resources.files("vldm_jax").joinpath("assets", BUNDLED_BPE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = tuple(lines[1:_NUM_MERGES + 1])  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _tokenizer_folder(path: Path) -> Path:
    for folder in (path, path / "tokenizer"):
        if (folder / "vocab.json").exists() or (folder / "tokenizer.json").exists():
            return folder
    raise CheckpointError(f"{path}: no CLIP tokenizer files (vocab.json + merges.txt) here or in {path / 'tokenizer'}")


def load_tokenizer(path: str | os.PathLike | None = None, model_max_length: int = 77, *,
                   pad_token: str | None = None):
    """A ``transformers.CLIPTokenizer``.

    ``path``: a tokenizer folder, or a diffusers pipeline folder holding ``tokenizer/``; None uses the bundled
    vocabulary with SD 1.x padding (``pad_token="!"`` gives SD 2.x's). ``pad_token`` overrides the folder's.
    """
    from transformers import CLIPTokenizer

    kwargs = {"model_max_length": model_max_length}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    if path is not None:
        folder = _tokenizer_folder(Path(path))
        try:
            return CLIPTokenizer.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0]}") from None
    kwargs.setdefault("pad_token", SD1_PAD_TOKEN)
    vocab, merges = bundled_vocab_and_merges()
    # Written out and read back through from_pretrained: the one constructor transformers 4 and 5 share.
    with tempfile.TemporaryDirectory(prefix="vldm_clip_tokenizer_") as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
                                             **kwargs)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
    """Token ids ``(B, max_length)`` int32: start token, prompt, end token, padding; long prompts truncated
    (the end token is kept)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, dtype=np.int32)

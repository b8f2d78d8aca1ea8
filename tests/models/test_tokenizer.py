"""The bundled CLIP tokenizer reproduces OpenAI CLIP's ids; folders load; tokenize pads and truncates."""

import gzip
from importlib import resources

import numpy as np
import pytest
import regex

from vldm_jax.errors import CheckpointError
from vldm_jax.models.tokenizer import bytes_to_unicode, load_tokenizer, tokenize

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, 4k, highly detailed!!",
    "  Tabs\tand   spaces, don't stop; it's fine  ",
    "naïve café — 東京 🙂",
    "x" * 30,
]


class ReferenceBPE:
    """OpenAI CLIP's SimpleTokenizer algorithm, written out independently of the code under test
    (without ftfy, which only repairs mojibake: our prompts are clean)."""

    def __init__(self):
        data = resources.files("vldm_jax").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
        merges = [tuple(m.split()) for m in gzip.decompress(data).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                 r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text):
        text = " ".join(text.split()).lower()
        ids = [49406]
        for tok in regex.findall(self.pat, text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids += [self.encoder[p] for p in self.bpe(tok)]
        return ids + [49407]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_known_ids(tok):
    assert tok.convert_tokens_to_ids("<|startoftext|>") == 49406
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 49407
    assert len(tok) == 49408
    ids = tokenize(tok, "a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (ids[0, 7:] == 49407).all()  # SD 1.x pads with the end token


def test_matches_reference_algorithm(tok):
    ref = ReferenceBPE()
    for prompt in PROMPTS:
        assert tok(prompt)["input_ids"] == ref.encode(prompt), prompt


def test_tokenize_pads_and_truncates(tok):
    ids = tokenize(tok, ["a photo of a cat", "cat " * 200], max_length=77)
    assert ids.shape == (2, 77)
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:-1] == ids[1, 1]).all()
    short = tokenize(tok, ["a photo of a cat"], max_length=5)
    np.testing.assert_array_equal(short[0], [49406, 320, 1125, 539, 49407])


def test_sd2_padding():
    ids = tokenize(load_tokenizer(pad_token="!"), "a photo of a cat", max_length=10)
    np.testing.assert_array_equal(ids[0], [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0])


def test_folder_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "pipe" / "tokenizer")
    for path in (tmp_path / "pipe" / "tokenizer", tmp_path / "pipe"):  # the folder, or a pipeline folder
        loaded = load_tokenizer(path)
        np.testing.assert_array_equal(tokenize(loaded, PROMPTS), tokenize(tok, PROMPTS))
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "nowhere")

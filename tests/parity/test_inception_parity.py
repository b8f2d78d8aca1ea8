"""The FID Inception and per-frame FID against a PyTorch reference with random weights, saved to disk in
pytorch-fid's key names and loaded by our loader.

pytorch-fid (0.3.0) cannot be imported here: its ``inception.py`` imports torchvision at the top and subclasses
torchvision's Inception blocks, and torchvision is not installed (its wheel would replace the CPU torch). The
reference below is therefore written out: torchvision's ``BasicConv2d`` and ``Inception3`` stem / blocks
(``InceptionA``..``E``) with pytorch-fid's patches (``FIDInceptionA``/``C``/``E_1``: the pool branch's average
ignores padding; ``FIDInceptionE_2``: a max pool), pytorch-fid's ``InceptionV3`` block order up to pool3, and its
input handling (``F.interpolate`` bilinear ``align_corners=False`` of [0, 1] images, then ``2x - 1``).

Small and fast: a 1/8-width network (every channel count x 1/8; the layer graph is the real one) at 75x75, the
smallest input the architecture allows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
scipy_linalg = pytest.importorskip("scipy.linalg")
nn = torch.nn
F = torch.nn.functional

from vldm_jax.checkpoints.inception import load_inception  # noqa: E402
from vldm_jax.checkpoints.safetensors_io import write_safetensors  # noqa: E402
from vldm_jax.errors import CheckpointError, UserError  # noqa: E402
from vldm_jax.eval.fid import fid_of_folders, inception_extractor  # noqa: E402
from vldm_jax.io.video import write_video  # noqa: E402
from vldm_jax.models.inception import InceptionConfig  # noqa: E402

WIDTH, SIZE = 0.125, 75


def c(n):
    return max(1, int(round(n * WIDTH)))


# ---- torchvision's Inception3 pieces (torchvision/models/inception.py), channel counts through c() ----
class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class FIDInceptionA(nn.Module):  # torchvision InceptionA + pytorch-fid's FIDInceptionA.forward
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, c(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, c(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, c(pool_features), kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, c(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(nn.Module):  # torchvision InceptionC + pytorch-fid's FIDInceptionC.forward
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = c(channels_7x7)
        self.branch1x1 = BasicConv2d(cin, c(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, c(192), kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(d))))
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch7x7, d, branch_pool], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, c(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, c(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):  # torchvision InceptionE + pytorch-fid's FIDInceptionE_1 / _2 forward
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, c(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, c(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, c(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, c(192), kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.max_pool:  # FIDInceptionE_2
            branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:  # FIDInceptionE_1
            branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([branch1x1, b3, d, self.branch_pool(branch_pool)], 1)


class FIDInception3(nn.Module):
    """pytorch-fid's fid_inception_v3(): torchvision Inception3(num_classes=1008, aux_logits=False), patched."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), kernel_size=3)
        self.Mixed_5b = FIDInceptionA(c(192), pool_features=32)
        a = c(64) + c(64) + c(96)
        self.Mixed_5c = FIDInceptionA(a + c(32), pool_features=64)
        self.Mixed_5d = FIDInceptionA(a + c(64), pool_features=64)
        self.Mixed_6a = InceptionB(a + c(64))
        cin = c(384) + c(96) + a + c(64)
        self.Mixed_6b = FIDInceptionC(cin, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(4 * c(192), channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(4 * c(192), channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(4 * c(192), channels_7x7=192)
        self.Mixed_7a = InceptionD(4 * c(192))
        e_in = c(320) + c(192) + 4 * c(192)
        self.Mixed_7b = FIDInceptionE(e_in, max_pool=False)
        e_out = c(320) + 4 * c(384) + c(192)
        self.Mixed_7c = FIDInceptionE(e_out, max_pool=True)
        self.fc = nn.Linear(e_out, 1008)

    def pool3(self, inp):
        """pytorch-fid InceptionV3(output_blocks=[3]) forward: resize, normalise, blocks 0-3."""
        x = F.interpolate(inp, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, output_size=(1, 1))[:, :, 0, 0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    ref = FIDInception3()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial batch-norm statistics, so a mis-mapped one shows
        for m in ref.modules():
            if isinstance(m, nn.Conv2d):  # He init keeps the activations' spread through 20 layers
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    ref.eval()
    folder = tmp_path_factory.mktemp("inception")
    (folder / "inception_config.json").write_text(json.dumps({"width": WIDTH}))
    sd = ref.state_dict()
    write_safetensors(folder / "pt_inception.safetensors", {k: v.numpy() for k, v in sd.items()})
    pickled = tmp_path_factory.mktemp("inception_pth")
    (pickled / "inception_config.json").write_text(json.dumps({"width": WIDTH}))
    torch.save(sd, pickled / "pt_inception-2015-12-05-6726825d.pth")
    ours = load_inception(folder)
    return ref, folder, pickled, ours, inception_extractor(ours, size=SIZE, batch_size=4)


def reference_features(ref, frames_uint8):
    x = torch.from_numpy(frames_uint8).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid: ToTensor
    with torch.no_grad():
        return ref.pool3(x).numpy().astype(np.float64)


def reference_fid(fa, fb):
    """pytorch-fid's calculate_frechet_distance (np.cov + scipy.linalg.sqrtm)."""
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean, _ = scipy_linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_features_and_fid_match_pytorch(reference, tmp_path, capsys):
    """pool3 features of every frame (1e-4), FID of an image folder vs a video folder (1e-3), the CLI."""
    import imageio.v3 as iio

    from vldm_jax.cli import main

    ref, folder, _, _, ex = reference
    rng = np.random.default_rng(3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    images = rng.integers(0, 256, size=(5, 64, 64, 3)).astype(np.uint8)
    for i, img in enumerate(images):
        iio.imwrite(tmp_path / "a" / f"{i}.png", img)
    video = np.clip(rng.integers(0, 200, size=(6, 64, 64, 3)) + 50, 0, 255).astype(np.uint8)
    write_video(tmp_path / "b" / "v.gif", video)
    video = iio.imread(tmp_path / "b" / "v.gif", index=None)[..., :3]  # what the GIF holds

    fa, fb = reference_features(ref, images), reference_features(ref, video)
    ours = ex(images)
    assert ours.shape == fa.shape == (5, 256)
    err = rel_err(ours, fa)
    print("Inception pool3 rel err", err)
    assert err < 1e-4

    out = fid_of_folders(tmp_path / "a", tmp_path / "b", ex)
    expected = reference_fid(fa, fb)
    print("FID ours", out["fid"], "pytorch+scipy", expected)
    assert (out["n_real"], out["n_generated"]) == (5, 6)
    assert abs(out["fid"] - expected) / abs(expected) < 1e-3

    # the CLI: same number; saved statistics in place of the folder; --frames takes the first frames
    args = ["eval", "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--inception", str(folder), "--size",
            str(SIZE), "--batch", "4", "--json", str(tmp_path / "fid.json"), "--save-stats", str(tmp_path / "r.npz")]
    assert main(args) == 0
    result = json.loads((tmp_path / "fid.json").read_text())
    assert abs(result["fid"] - expected) / expected < 1e-3 and result["n_generated"] == 6
    out = fid_of_folders(tmp_path / "r.npz", tmp_path / "b", ex, frames=3)  # saved statistics, first frames
    assert out["n_generated"] == 3
    assert abs(out["fid"] - reference_fid(fa, fb[:3])) / reference_fid(fa, fb[:3]) < 1e-3
    assert main(["eval", "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--inception", str(folder),
                 "--size", "64"]) == 2
    assert "at least 75" in capsys.readouterr().err


def test_checkpoint_formats_and_errors(reference, tmp_path):
    """.pth needs --allow-pickle; pytorch-fid's InceptionV3 wrapper names (blocks.i.j, no fc) load too;
    a missing key is named."""
    ref, folder, pickled, ours, ex = reference
    with pytest.raises(CheckpointError, match="pickle"):
        load_inception(pickled)
    from_pth = load_inception(pickled, allow_pickle=True)
    def same_weights(a, b):
        fa, fb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
        return [p for p, _ in fa] == [p for p, _ in fb] and all(
            np.array_equal(np.asarray(x.get_value()), np.asarray(y.get_value())) for (_, x), (_, y) in zip(fa, fb))

    assert same_weights(from_pth, ours)
    assert ours.has_logits and from_pth.has_logits

    blocks = [["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"], ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
              ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
              ["Mixed_7a", "Mixed_7b", "Mixed_7c"]]
    where = {name: f"blocks.{i}.{j}" for i, names in enumerate(blocks) for j, name in enumerate(names)}
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    wrapper = {where[k.split(".")[0]] + k[len(k.split(".")[0]):]: v for k, v in sd.items() if not k.startswith("fc.")}
    wrapper["blocks.0.0.bn.num_batches_tracked"] = np.zeros((), np.int64)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "inception_config.json").write_text(json.dumps({"width": WIDTH}))
    write_safetensors(tmp_path / "w" / "fid_wrapper.safetensors", wrapper)
    from_wrapper = load_inception(tmp_path / "w")
    assert not from_wrapper.has_logits
    assert not same_weights(from_wrapper, ours)  # its fc is zero
    from_wrapper.fc = ours.fc
    assert same_weights(from_wrapper, ours)

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "inception_config.json").write_text(json.dumps({"width": WIDTH}))
    write_safetensors(tmp_path / "bad" / "x.safetensors", {k: v for k, v in sd.items() if "Mixed_6c.branch1x1" not in k})
    with pytest.raises(CheckpointError, match="missing keys: Mixed_6c.branch1x1"):
        load_inception(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="Conv2d_1a_3x3"):  # full-width config against 1/8-width weights
        load_inception(folder / "pt_inception.safetensors", config=InceptionConfig())
    with pytest.raises(UserError, match="smaller than its minimum"):
        inception_extractor(ours, size=64, batch_size=1)(np.zeros((1, 8, 8, 3), np.uint8))

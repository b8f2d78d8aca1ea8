"""I3D and FVD against the reference PyTorch Inception-I3D (cd-fvd's copy of piergiaj/pytorch-i3d, the network
of the FVD implementations) with random weights, saved to disk and loaded by our loader.

Input: 10 frames at 193x193, the smallest that reaches the head's (2, 7, 7) pool (16 at 224 is the
protocol's; the network is the same, the test is 2.5x cheaper).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytorch_i3d = pytest.importorskip("cdfvd.third_party.i3d.pytorch_i3d")
scipy_linalg = pytest.importorskip("scipy.linalg")

import jax.numpy as jnp  # noqa: E402

from vldm_jax.checkpoints.i3d import i3d_state_dict, load_i3d  # noqa: E402
from vldm_jax.checkpoints.safetensors_io import write_safetensors  # noqa: E402
from vldm_jax.errors import CheckpointError, UserError  # noqa: E402
from vldm_jax.eval.fvd import fvd_of_folders, i3d_extractor  # noqa: E402
from vldm_jax.io.video import write_video  # noqa: E402

FRAMES, SIZE = 10, 193


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    ref = pytorch_i3d.InceptionI3d(400, in_channels=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial batch-norm statistics, so a mis-mapped one shows
        for m in ref.modules():
            if isinstance(m, torch.nn.Conv3d):  # He init keeps the logits' spread (the default shrinks it)
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if isinstance(m, torch.nn.BatchNorm3d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    ref.eval()
    folder = tmp_path_factory.mktemp("i3d")
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    write_safetensors(folder / "i3d.safetensors", sd)
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, folder / "i3d_pretrained_400.pt")
    ours = load_i3d(folder / "i3d.safetensors")
    return ref, folder, ours, i3d_extractor(ours, size=SIZE, frames=FRAMES, batch_size=3)


def reference_preprocess(videos_uint8):
    """cd-fvd's preprocess_i3d at our reduced size."""
    from cdfvd.third_party.i3d.utils import preprocess_i3d

    return preprocess_i3d(videos_uint8, target_resolution=(SIZE, SIZE))


def test_pickle_checkpoint_and_errors(reference, tmp_path):
    ref, folder, ours, _ = reference
    with pytest.raises(CheckpointError, match="pickle"):
        load_i3d(folder / "i3d_pretrained_400.pt")
    from_pt = load_i3d(folder / "i3d_pretrained_400.pt", allow_pickle=True)  # DataParallel "module." prefix
    a, b = i3d_state_dict(from_pt), i3d_state_dict(ours)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # our writer gives back the port's state dict (and it loads into PyTorch)
    sd = ref.state_dict()
    assert {k for k in sd if not k.endswith("num_batches_tracked")} == set(b)
    assert all(np.array_equal(sd[k].numpy(), b[k]) for k in b)
    bad = {k: v for k, v in b.items() if "Mixed_5c.b0" not in k}
    write_safetensors(tmp_path / "bad.safetensors", bad)
    with pytest.raises(CheckpointError, match="missing keys: Mixed_5c.b0"):
        load_i3d(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="too small"):
        i3d_extractor(ours, size=64, frames=FRAMES, batch_size=1)(np.zeros((1, FRAMES, 8, 8, 3), np.uint8))


def reference_features(ref, folder):
    import imageio.v3 as iio

    vids = np.stack([iio.imread(p, index=None)[..., :3] for p in sorted(folder.glob("*.gif"))])
    with torch.no_grad():
        return vids[:, :FRAMES], ref(reference_preprocess(vids[:, :FRAMES])).numpy().astype(np.float64)


def reference_fvd(fa, fb):
    """The same computation in PyTorch + scipy: cd-fvd's preprocessing, the PyTorch I3D, np.cov and
    scipy.linalg.sqrtm (as pytorch-fid / StyleGAN-V compute the distance)."""
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean, _ = scipy_linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_features_and_fvd_match_pytorch_scipy(reference, tmp_path):
    """Preprocessing, the 400 logits of each video (1e-4), and FVD between two folders of GIFs (1e-3)."""
    ref, _, _, ex = reference
    rng = np.random.default_rng(3)
    for name, n, shift in (("a", 3, 0), ("b", 3, 60)):
        (tmp_path / name).mkdir()
        for i in range(n):
            v = np.clip(rng.integers(0, 200, size=(FRAMES + 2, 32, 32, 3)) + shift, 0, 255).astype(np.uint8)
            write_video(tmp_path / name / f"{i:03d}.gif", v)
    videos, fa = reference_features(ref, tmp_path / "a")
    _, fb = reference_features(ref, tmp_path / "b")
    from vldm_jax.eval.features import I3DPreprocess

    pre = np.asarray(I3DPreprocess(size=SIZE, frames=FRAMES)(jnp.asarray(videos)))
    assert rel_err(pre, reference_preprocess(videos).permute(0, 2, 3, 4, 1).numpy()) < 1e-5
    ours = ex(videos)
    assert ours.shape == fa.shape == (3, 400)
    err = rel_err(ours, fa)
    print("I3D logits rel err", err)
    assert err < 1e-4

    out = fvd_of_folders(tmp_path / "a", tmp_path / "b", ex, frames=FRAMES)
    expected = reference_fvd(fa, fb)
    print("FVD ours", out["fvd"], "pytorch+scipy", expected)
    assert (out["n_real"], out["n_generated"]) == (3, 3)
    assert abs(out["fvd"] - expected) / abs(expected) < 1e-3

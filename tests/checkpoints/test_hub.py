"""Hub ids go through huggingface_hub's real snapshot_download; here offline, against a local cache."""

import json
import os
import shutil
import subprocess
import sys

from tests.helpers.tiny_sd import make_tiny_sd_pipeline_folder


def _fake_hub_cache(cache, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """The on-disk layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<rev>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


SCRIPT = """
import sys, vldm_jax as vl
pipe = vl.TextToImagePipeline.from_pretrained(sys.argv[1])
print("blocks", list(pipe.unet.config.block_out_channels))
"""


def test_hub_id_loads_from_cache_offline(tmp_path):
    folder = make_tiny_sd_pipeline_folder(tmp_path, "sd1")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/tiny-sd", folder)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "someone/tiny-sd"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"]
    assert f"blocks {expected}" in proc.stdout

    # An id that is not cached fails with one line naming it (offline), through the CLI too.
    proc = subprocess.run([sys.executable, "-m", "vldm_jax.cli", "txt2img", "x", "--checkpoint", "someone/absent",
                           "--out", str(tmp_path / "a.png")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "someone/absent" in proc.stderr and "Traceback" not in proc.stderr

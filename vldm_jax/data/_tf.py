"""The one place TensorFlow is imported for the data pipeline.

TF runs beside JAX in the same process; it must never claim an accelerator (it would take the
GPU's memory or the TPU from JAX), and its thread pools must stay modest so that they do not
fight the training step for CPU. Both settings only take effect before TF runs its first op,
so every data module imports TF through here. ``VLDM_TF_THREADS`` sets TF's op thread pools
(default: half the cores, at most 4).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("vldm_jax.data")

_configured = False


def _configure(tf) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError) as e:
            # RuntimeError: TF already initialised its devices (someone ran an op before us).
            log.warning("could not hide %s devices from TensorFlow: %s", kind, e)
    threads = int(os.environ.get("VLDM_TF_THREADS", "0")) or max(1, min(4, (os.cpu_count() or 2) // 2))
    try:
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        pass


def import_tf():
    """Returns ``(tf, tfds)`` with TF hidden from accelerators; raises a UserError without the data extra."""
    # Quiet TF's C++ start-up chatter unless the user asked for it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        from vldm_jax.errors import UserError

        raise UserError(f"the data pipeline needs the 'data' extra: pip install 'vldm_jax[data]' ({e})") from None
    _configure(tf)
    return tf, tfds


tf, tfds = import_tf()


def download_and_prepare(builder) -> None:
    """Prepares a local builder offline: nothing is downloaded, statistics are not computed
    (they would decode every clip again), an existing build is reused."""
    config = tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
        try_download_gcs=False,
    )
    builder.download_and_prepare(download_config=config)

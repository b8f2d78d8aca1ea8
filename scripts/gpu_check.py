"""GPU checks that the CPU suite cannot make: attention kernels in bf16 (cuDNN vs XLA), and the medium U-Nets of
scripts/benchmark.py side by side with diffusers on the same GPU, float32 and bfloat16.

    python scripts/gpu_check.py --out gpu_check.json     # on a machine with a CUDA GPU, jax[cuda] and torch

Numerics: each result is compared with a float32 reference by ||out - ref|| / ||ref||. Timing: median of
``--reps`` calls after a warm-up, with ``block_until_ready`` / ``torch.cuda.synchronize`` around each call.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # vldm_jax from this checkout
from benchmark import SIZES, Jax, _hw, _randn, stats, video_unet_inputs  # noqa: E402

DEVICE = "cuda"


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def torch_time(fn, reps: int) -> dict:
    import torch

    with torch.inference_mode():
        fn()
        _sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync()
            times.append(time.perf_counter() - t0)
    return stats(times)


def check_attention(reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from vldm_jax.nn import attention as attn

    rows = []
    rng = np.random.default_rng(0)
    for b, t, n, h in ((2, 4096, 8, 40), (2, 1024, 8, 64), (28, 1024, 5, 64), (8, 256, 16, 64)):
        q, k, v = (rng.standard_normal((b, t, n, h)).astype(np.float32) for _ in range(3))
        ref = np.asarray(jax.nn.dot_product_attention(*(jnp.asarray(x) for x in (q, k, v)), implementation="xla"))
        for impl in ("xla", "cudnn", "chunked"):
            attn.ATTENTION_IMPLEMENTATION = impl
            try:
                fn = Jax(lambda q, k, v: attn.dot_product_attention(q, k, v),
                         *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
                out = np.asarray(fn().astype(jnp.float32))
                timing = stats([_timed(fn) for _ in range(reps)])
                rows.append({"shape": [b, t, n, h], "impl": impl, "dtype": "bfloat16", "rel_err": rel(out, ref),
                             "finite": bool(np.isfinite(out).all()), **timing})
            except Exception as e:  # noqa: BLE001 - a kernel that is not available is a result too
                rows.append({"shape": [b, t, n, h], "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})
            print(rows[-1], flush=True)
    attn.ATTENTION_IMPLEMENTATION = None
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check_unet(kind: str, size: str, reps: int, folder: Path) -> list[dict]:
    import diffusers
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import vldm_jax

    cfg = SIZES[size]
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    if kind == "video":
        ref = diffusers.UNetSpatioTemporalConditionModel(**cfg["video_unet"]).eval()
        c = ref.config
        b, f, (h, w) = cfg["video"]["batch"], cfg["video"]["frames"], _hw(cfg["video"]["latent"])
        x, ctx, ids = video_unet_inputs(cfg, c, rng)
        ours_args = (x, np.float32(500.0), ctx, ids)
        torch_args = (x.transpose(0, 1, 4, 2, 3).copy(), None, ctx, ids)

        def torch_call(m, a):
            return m(a[0], torch.tensor(500.0, device=DEVICE), a[2], a[3]).sample

        to_ours = lambda y: y.permute(0, 1, 3, 4, 2)  # noqa: E731
        shapes = f"B={b} F={f} {h}x{w}x{c.in_channels}"
    else:
        ref = diffusers.UNet2DConditionModel(**cfg["image_unet"]).eval()
        c = ref.config
        b, (h, w) = 2 * cfg["image"]["batch"], _hw(cfg["image"]["latent"])
        x = _randn(rng, (b, h, w, c.in_channels))
        ctx = _randn(rng, (b, cfg["text"]["seq"], c.cross_attention_dim))
        ours_args = (x, np.int32(500), ctx)
        torch_args = (x.transpose(0, 3, 1, 2).copy(), None, ctx)

        def torch_call(m, a):
            return m(a[0], 500, encoder_hidden_states=a[2]).sample

        to_ours = lambda y: y.permute(0, 2, 3, 1)  # noqa: E731
        shapes = f"B={b} {h}x{w}x{c.in_channels}"
    path = folder / f"{kind}_{size}"
    ref.save_pretrained(path, safe_serialization=True)
    rows = []
    outputs = {}
    for dtype_name, jdt, tdt in (("float32", jnp.float32, torch.float32), ("bfloat16", jnp.bfloat16, torch.bfloat16)):
        model = vldm_jax.load_model(path, dtype=jdt, param_dtype=jdt)
        graphdef, state = nnx.split(model)
        args = [jnp.asarray(a, jdt) if a.dtype == np.float32 and a.ndim > 1 else jnp.asarray(a) for a in ours_args]
        fn = Jax(lambda s, *a: nnx.merge(graphdef, s)(*a), state, *args)
        out = np.asarray(jnp.asarray(fn(), jnp.float32))
        ours = {**stats([_timed(fn) for _ in range(reps)]), "compile_s": fn.compile_s, "xla_flops": fn.flops}
        tm = ref.to(DEVICE, tdt)
        targs = [None if a is None else torch.from_numpy(a).to(DEVICE, tdt) for a in torch_args]
        with torch.inference_mode():
            tout = to_ours(torch_call(tm, targs)).float().cpu().numpy()
        theirs = torch_time(lambda: torch_call(tm, targs), reps)
        outputs[dtype_name] = (out, tout)
        row = {"model": f"{kind} U-Net {size}", "shapes": shapes, "dtype": dtype_name, "ours": ours,
               "diffusers": theirs, "speedup_vs_diffusers": theirs["median_s"] / ours["median_s"],
               "rel_err_vs_diffusers": rel(out, tout)}
        if ours["xla_flops"]:
            row["ours_tflops_per_s"] = ours["xla_flops"] / ours["median_s"] / 1e12
        rows.append(row)
        print({k: v for k, v in row.items() if k not in ("ours", "diffusers")},
              {"ours_ms": 1e3 * ours["median_s"], "diffusers_ms": 1e3 * theirs["median_s"]}, flush=True)
        del model, state
    # bf16 against the float32 diffusers output: what precision costs.
    rows[-1]["rel_err_bf16_vs_fp32_diffusers"] = rel(outputs["bfloat16"][0], outputs["float32"][1])
    rows[-1]["rel_err_diffusers_bf16_vs_fp32"] = rel(outputs["bfloat16"][1], outputs["float32"][1])
    del ref
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def matmul_rates() -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    for name, dt, n in (("bfloat16", jnp.bfloat16, 8192), ("float32", jnp.float32, 4096)):
        a = jax.random.normal(jax.random.key(0), (n, n), dt)
        bm = jax.random.normal(jax.random.key(1), (n, n), dt)
        fn = Jax(lambda a, b: a @ b, a, bm)
        fn()
        t = stats([_timed(fn) for _ in range(10)])
        out[name] = {"n": n, "tflops_per_s": 2 * n ** 3 / t["median_s"] / 1e12}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--only", nargs="+", default=["matmul", "attention", "video", "image"])
    p.add_argument("--size", default="medium", choices=sorted(SIZES))
    p.add_argument("--torch-device", default="cuda", help="where diffusers runs (cpu: a dry run of this script)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.torch_device
    import jax

    result = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    try:
        import torch

        result["torch"] = torch.__version__
        result["gpu"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else None
    except Exception as e:  # noqa: BLE001
        result["torch_error"] = str(e)

    def save():
        Path(args.out).write_text(json.dumps(result, indent=1))

    if "matmul" in args.only:
        result["matmul"] = matmul_rates()
        print(result["matmul"], flush=True)
        save()
    if "attention" in args.only:
        result["attention"] = check_attention(args.reps)
        save()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("video", "image"):
            if kind in args.only:
                try:
                    result.setdefault("unets", []).extend(check_unet(kind, args.size, args.reps, Path(tmp)))
                except Exception as e:  # noqa: BLE001
                    result.setdefault("errors", []).append(f"{kind}: {type(e).__name__}: {e}"[:500])
                    print(result["errors"][-1], flush=True)
                save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

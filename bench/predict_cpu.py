"""predict-cpu: PNGs in storage to Parquet rows through ``dala predict``'s path, on the CPU.

"Ours" is :func:`dala_model.serving.scoring.score_source` end to end on a case-folder drop of
the suite's synthetic PNGs (700x460, the archive's size): discover, hash and check every file,
write OUT's manifest, hand the check's decoded pixels to the scorer resized
(``scoring.PixelHandoff``), score with the promoted model as the engine tunes it
(``precision="auto"``: ``dala_model.engine.autotune``), write the image and case Parquet. Each
repetition scores into a fresh OUT, so nothing is skipped as already scored.

Besides ours, three rates are timed in the same interleaved rounds (``bench.harness.interleaved``):

- reference (the goal, from issue 12): the engine's own infer-cpu rate, i.e.
  ``predict_logits`` with the same tuned choice on the same images already decoded to uint8, the
  model's BatchNorms folded as the scorer folds them (``fold_batchnorm``), so
  the ratio is the fraction of pure inference speed the whole path keeps; >= 0.8 means decoding
  and I/O overlap or cost little beside compute;
- naive: a loop that opens each PNG with PIL, converts and resizes it, runs the torchvision eval
  transform and ``model(x[None])`` one image at a time, and writes the rows to one Parquet file;
- no-handoff (``extra.no_handoff_images_per_s``): ours with ``handoff_bytes=0``, every file read
  and decoded a second time to be scored: what the handoff is worth, measured in the same run.

The model is dalaresnet50 trained one epoch (fp32, NCHW: no training autotune) on a few small
synthetic images and promoted under a registry root of its own: the path needs a promoted,
complete run; its speed does not depend on what the weights learned.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bench.data import synthesize
from bench.harness import Goal, entry, interleaved, median, rates
from dala_model import storage
from dala_model.data.cache import resize
from dala_model.data.ingest import ingest
from dala_model.data.splits import make_split
from dala_model.engine.config import TrainConfig
from dala_model.engine.inference import fold_batchnorm, predict_logits, tuned
from dala_model.engine.train import train
from dala_model.models.checkpoint import load_model
from dala_model.models.transforms import eval_transform
from dala_model.serving import promotion
from dala_model.serving.scoring import HANDOFF_BYTES, score_source

MODEL = "dalaresnet50"
MAGNIFICATION = 40
CPU = torch.device("cpu")


def registry(work: Path, size: int) -> str:
    """A root with one promoted 40X model, trained one epoch on small synthetic images."""
    root = str(work / "registry")
    synthesize(work / "registry-png", patients=8, per_patient=2, seed=7, size=(128, 96))
    ingest(str(work / "registry-png"), root, cache_size=size)
    make_split(root, "patient", seed=0)
    config = TrainConfig(
        root=root,
        magnification=MAGNIFICATION,
        epochs=1,
        batch_size=8,
        image_size=size,
        device="cpu",
        precision="fp32",
        channels_last=False,
    )
    train(config)
    promotion.promote(root, storage.join(root, "runs", config.resolved_run_id))
    return root


def drop(work: Path, files: list[Path]) -> Path:
    """``files`` as a case-folder drop: ``<case>/40X/scan_<k>.png`` (non-BreakHis names)."""
    source = work / "drop"
    shutil.rmtree(source, ignore_errors=True)
    for k, path in enumerate(files):
        target = source / f"case-{k // 8:04d}" / f"{MAGNIFICATION}X" / f"scan_{k:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return source


def naive_loop(model: torch.nn.Module, paths: list[Path], size: int, out: Path) -> None:
    """PIL decode + resize, eval transform, ``model(x[None])`` per image, then one Parquet file."""
    transform = eval_transform("paper", size)
    probs = []
    model.eval()
    with torch.no_grad():
        for path in paths:
            with Image.open(path) as image:
                pixels = resize(image.convert("RGB"), size)
            x = transform(torch.from_numpy(np.array(pixels)).permute(2, 0, 1)).unsqueeze(0)
            probs.append(float(torch.softmax(model(x), 1)[0, 1]))
    frame = pd.DataFrame({"uri": [str(p) for p in paths], "prob_malignant": probs})
    frame.to_parquet(out / f"naive-{uuid.uuid4().hex[:8]}.parquet")


def run(work: Path, files: list[Path], *, size: int, images: int, reps: int) -> dict[str, Any]:
    paths = [f for f in files if f.parent.name == f"{MAGNIFICATION}X"][:images]
    if len(paths) < images:
        raise ValueError(
            f"predict-cpu asks for {images} images at {MAGNIFICATION}X, the workspace has "
            f"{len(paths)}; raise --ingest-sizes or lower --predict-images"
        )
    root = registry(work, size)
    source = drop(work, paths)
    outs = work / "predict-out"
    record = promotion.current_record(root, MODEL, MAGNIFICATION)
    served = load_model(record.checkpoint_uri)
    fold_batchnorm(served)  # the scorer's arithmetic
    net, kwargs, choice = tuned(served, model_name=MODEL, image_size=size, device=CPU)
    decoded = np.stack([resize(Image.open(p).convert("RGB"), size) for p in paths])
    naive_model = load_model(record.checkpoint_uri)  # fp32 NCHW, as loaded
    (outs / "naive").mkdir(parents=True, exist_ok=True)
    results: list[Any] = []

    def ours(handoff_bytes: int = HANDOFF_BYTES, into: list[Any] = results) -> None:
        out = str(outs / uuid.uuid4().hex[:8])
        kwargs = {"model": MODEL, "device": "cpu", "handoff_bytes": handoff_bytes}
        into.append(score_source(str(source), root, out, **kwargs))

    seconds = interleaved(
        {
            "ours": ours,
            "infer": lambda: predict_logits(net, decoded, preset="paper", **kwargs),
            "naive": lambda: naive_loop(naive_model, paths, size, outs / "naive"),
            "no-handoff": lambda: ours(handoff_bytes=0, into=[]),
        },
        reps,
    )
    measured = {k: rates(len(paths), v) for k, v in seconds.items()}
    last = results[-1].magnifications
    scored = sum(m.scored for m in last)
    if scored != len(paths):
        raise RuntimeError(f"predict-cpu scored {scored} of {len(paths)} images in its last run")
    ours_rate, infer_rate, naive_rate = (median(measured[k]) for k in ("ours", "infer", "naive"))
    tuning = next(m.tuning for m in last if m.tuning)
    return entry(
        "predict-cpu",
        "images/s",
        ours_rate,
        infer_rate,
        ratio_means="ours / the engine's infer-cpu rate on the same images pre-decoded (same rounds)",
        goal=Goal("ratio", low=0.8),
        settings={
            "model": f"{MODEL} ({MAGNIFICATION}X, one epoch on synthetic images)",
            "images": len(paths),
            "png_size": "700x460 synthetic",
            "size": size,
            "reps": reps,
            "warmup": 1,
            "timing": "interleaved rounds: ours, infer, naive, no-handoff",
            "threads": torch.get_num_threads(),
            "ours": "dala_model.serving.scoring.score_source: case-folder drop -> OUT Parquet, "
            "a fresh OUT per repetition",
            "reference": f"predict_logits with the tuned {choice.label} on pre-decoded uint8, "
            "BatchNorm folded as the scorer folds it",
            "naive": "PIL decode + resize, eval_transform, model(x[None]) per image, one Parquet",
        },
        reps={k: measured[k] for k in ("ours", "infer", "naive", "no-handoff")},
        extra={
            "naive_images_per_s": naive_rate,
            "speedup_vs_naive": ours_rate / naive_rate,
            "no_handoff_images_per_s": median(measured["no-handoff"]),
            "handoff_speedup": ours_rate / median(measured["no-handoff"]),
            "infer_cpu_images_per_s": infer_rate,
            "tuning": tuning,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
    )

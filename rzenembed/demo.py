"""The local demo: prepare the sample corpus on Ray, then embed with the tiny model.

    python -m rzenembed.demo --config configs/tiny.yaml --out runs/demo   (`make demo`)

Until training, souping and evaluation land, this runs what exists end to end: the sample
corpus is generated (or reused) and prepared into versioned datasets and stage manifests
on a local Ray runtime; the tiny Qwen2-VL folder is written (or reused), loaded through the
same ``from_pretrained`` as a real checkpoint, and a text, an image, a video and a page are
embedded into one vector space. Rerunning it reuses every committed version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rzenembed.config import load_config
from rzenembed.modeling import EmbedInput, RzenEmbedder
from rzenembed.modeling.tiny import build_tiny_model


def synthetic_image(color: tuple[int, int, int], size: tuple[int, int] = (112, 84)) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(image).ellipse((20, 10, 90, 70), fill=color)
    return image


def synthetic_video(frames: int = 6) -> list[Image.Image]:
    """A red square sliding left to right."""
    out = []
    for t in range(frames):
        image = Image.new("RGB", (96, 72), (20, 20, 60))
        x = 8 + t * 12
        ImageDraw.Draw(image).rectangle((x, 24, x + 20, 44), fill=(220, 30, 30))
        out.append(image)
    return out


def synthetic_page() -> Image.Image:
    image = Image.new("RGB", (140, 196), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), "Quarterly report", fill="black")
    for row in range(6):
        draw.rectangle((8, 40 + row * 22, 20 + row * 18, 52 + row * 22), fill=(60, 90, 200))
    return image


def demo_inputs() -> list[tuple[str, EmbedInput]]:
    return [
        (
            "text",
            EmbedInput(
                text="A red ball on a grey floor.",
                instruction="Find an image that matches the given caption.",
            ),
        ),
        ("image", EmbedInput(images=[synthetic_image((200, 30, 30))])),
        ("video", EmbedInput(video=synthetic_video(), instruction="Represent the given video.")),
        (
            "page",
            EmbedInput(
                images=[synthetic_page()],
                instruction="Understand the content of the provided document image.",
            ),
        ),
    ]


def prepare_data(cfg) -> None:
    """Generate the sample corpus when missing, prepare it, print counts per step."""
    from rzenembed.data.fanout import ensure_ray
    from rzenembed.data.sample import build_sample_corpus
    from rzenembed.prep.prepare import prepare_all

    corpus_dirs = {Path(s.uri).parent for s in cfg.sources}
    for folder in sorted(corpus_dirs):
        if not (folder / "sources.yaml").is_file():
            print(f"generating the sample corpus in {folder}")
            build_sample_corpus(folder, seed=cfg.seed)
    ensure_ray(address=cfg.compute.ray_address, num_cpus=2)
    prepared = prepare_all(cfg, show_progress=False)
    print(f"{'dataset':<24} {'step':<22} {'rows':>5} {'rejected':>8}  reasons")
    rows = [(n, st, v) for n, steps in prepared.versions.items() for st, v in steps.items()]
    rows += [
        (n, v.manifest.step, v) for n, v in prepared.final.items() if n not in prepared.versions
    ]
    for name, step, version in rows:
        m = version.manifest
        reasons = ", ".join(f"{k}={v}" for k, v in m.reject_counts.items())
        print(f"{name:<24} {step:<22} {m.rows:>5} {m.rejected:>8}  {reasons}")
    for stage, manifest in prepared.stages.items():
        mix = ", ".join(f"{d.dataset} {d.probability:.2f}" for d in manifest.datasets)
        print(f"stage manifest {stage}: {mix}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    if cfg.sources:
        prepare_data(cfg)
    model_dir = Path(cfg.model.name_or_path)
    if not (model_dir / "config.json").is_file():
        print(f"building the tiny offline model in {model_dir}")
        build_tiny_model(model_dir, seed=cfg.seed)
    embedder = RzenEmbedder.from_pretrained(model_dir, config=cfg.model)
    names, items = zip(*demo_inputs(), strict=True)
    vectors = embedder.encode(list(items), batch_size=4, show_progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", vectors.numpy())
    print(
        f"{len(names)} inputs -> {tuple(vectors.shape)} embeddings "
        f"(template {embedder.cfg.template})"
    )
    print("cosine similarities:")
    print("        " + " ".join(f"{n:>7}" for n in names))
    sims = vectors @ vectors.T
    for name, row in zip(names, sims.tolist(), strict=True):
        print(f"{name:>7} " + " ".join(f"{v:7.3f}" for v in row))
    print(f"embeddings saved to {out / 'embeddings.npy'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

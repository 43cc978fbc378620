"""The local demo: build the tiny offline model and embed text, an image, a video and a page.

    python -m rzenembed.demo --out runs/demo        (what `make demo` runs)

Until the full pipeline lands, this is the end-to-end example of the embedding path: the
tiny Qwen2-VL folder is written (or reused), loaded through the same ``from_pretrained``
as a real checkpoint, and four kinds of input land in one vector space.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
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

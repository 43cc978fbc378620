"""The made-up world of the sample corpus: drawing it, describing it, encoding it.

The sample corpus (``rzenembed.data.sample``) is about coloured shapes. This module draws
and describes that world: scenes of shapes on gradient backgrounds with their captions,
text pages with a bar chart, upscaled handwritten digits and short videos of moving
shapes. Every function takes its randomness from a ``numpy.random.Generator`` the caller
seeded, and every encoder writes the same bytes for the same pixels, so a corpus built
twice with one seed is identical.

It also holds the two image measures the corpus is checked against: the variance of the
Laplacian (sharpness) and a 64-bit DCT perceptual hash (near-duplicates).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from rzenembed.data import media as media_ops

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (34, 150, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 20),
    "purple": (130, 50, 170),
    "orange": (240, 125, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
# The nine cells of a 3x3 grid, row by row, as a short answer says them.
CELLS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
    "bottom right",
)  # fmt: skip
OUTLINE = (25, 25, 25)


def cell_phrase(cell: int) -> str:
    """Where a cell is, as a caption says it: "at the top left", "on the right", "in the centre"."""
    if cell == 4:
        return "in the centre"
    if cell in (3, 5):
        return f"on the {CELLS[cell]}"
    return f"at the {CELLS[cell]}"


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x")) else noun + "s"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Shape:
    """One drawn object: what it is, where its centre is and how large it is (pixels)."""

    kind: str
    colour: str
    x: float
    y: float
    radius: float
    angle: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    def bbox(self) -> tuple[int, int, int, int]:
        """The pixel box the drawn shape covers (left, top, right, bottom; right/bottom open)."""
        if self.kind == "circle":
            xs, ys = (
                [self.x - self.radius, self.x + self.radius],
                [self.y - self.radius, self.y + self.radius],
            )
        else:
            xs, ys = zip(*shape_polygon(self), strict=True)
        return (
            math.floor(min(xs)) - 1, math.floor(min(ys)) - 1, math.ceil(max(xs)) + 2,
            math.ceil(max(ys)) + 2,
        )  # fmt: skip


# --------------------------------------------------------------------------- drawing


def _star_points(radius: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def _outline_points(kind: str, radius: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred on the origin, before rotation."""
    r = radius
    if kind == "square":
        s = r * 0.82
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if kind == "triangle":
        return [(r * math.cos(a), r * math.sin(a) + r * 0.15) for a in (-1.5708, 0.5236, 2.618)]
    if kind == "diamond":
        return [(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)]
    if kind == "star":
        return _star_points(r)
    if kind == "cross":
        w = r * 0.32
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
                (-r, w), (-r, -w), (-w, -w)]  # fmt: skip
    raise ValueError(f"unknown shape {kind!r}")


def shape_polygon(shape: Shape) -> list[tuple[float, float]]:
    """Vertices of ``shape`` rotated by its angle and moved to its centre."""
    cos_a, sin_a = math.cos(math.radians(shape.angle)), math.sin(math.radians(shape.angle))
    return [
        (shape.x + px * cos_a - py * sin_a, shape.y + px * sin_a + py * cos_a)
        for px, py in _outline_points(shape.kind, shape.radius)
    ]


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, outline_width: int = 0) -> None:
    """Draw a shape filled with a dark rim, or only its coloured outline (``outline_width``).

    The dark rim keeps even a yellow shape on a pale background sharp for the blur check.
    """
    colour = COLOURS[shape.colour]
    fill, outline = (None, colour) if outline_width else (colour, OUTLINE)
    width = outline_width or 2
    if shape.kind == "circle":
        r = shape.radius
        box = (shape.x - r, shape.y - r, shape.x + r, shape.y + r)
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(shape_polygon(shape), fill=fill, outline=outline, width=width)


def gradient(
    size: tuple[int, int], start: Sequence[int], end: Sequence[int], angle: float
) -> Image.Image:
    """A linear two-colour gradient; varied backgrounds keep perceptual hashes apart."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = xs * math.cos(angle) + ys * math.sin(angle)
    t = (direction - direction.min()) / max(float(np.ptp(direction)), 1.0)
    start_rgb, end_rgb = np.asarray(start, np.float32), np.asarray(end, np.float32)
    pixels = start_rgb + t[..., None] * (end_rgb - start_rgb)
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def random_background(
    rng: np.random.Generator, size: tuple[int, int], dark: bool = False
) -> Image.Image:
    """A light (or dark) gradient in random colours at a random angle."""
    low, high = (15, 90) if dark else (165, 252)
    start = rng.integers(low, high, 3)
    end = rng.integers(low, high, 3)
    return gradient(size, start.tolist(), end.tolist(), float(rng.uniform(0, 2 * math.pi)))


def add_clutter(rng: np.random.Generator, image: Image.Image, lines: int) -> None:
    """Thin grey strokes that are not shapes of the world, to vary otherwise similar images."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(lines):
        x0, x1 = rng.integers(0, width, 2).tolist()
        y0, y1 = rng.integers(0, height, 2).tolist()
        grey = int(rng.integers(60, 200))
        draw.line((x0, y0, x1, y1), fill=(grey, grey, grey), width=int(rng.integers(1, 3)))


def render_scene(
    background: Image.Image, shapes: Sequence[Shape], outline_width: int = 0
) -> Image.Image:
    """Draw ``shapes`` in order on a copy of ``background``."""
    image = background.copy()
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape, outline_width)
    return image


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Placed:
    """A shape and the grid cell (0-8, row by row) a caption says it is in."""

    shape: Shape
    cell: int


def combo(index: int) -> tuple[str, str]:
    """The ``index``-th (shape, colour) pair of the world's 36."""
    return SHAPES[index // len(COLOURS)], list(COLOURS)[index % len(COLOURS)]


def random_colour(rng: np.random.Generator, exclude: str = "") -> str:
    return str(rng.choice([c for c in COLOURS if c != exclude]))


def place_shapes(rng: np.random.Generator, size: tuple[int, int], count: int) -> list[Placed]:
    """``count`` shapes of distinct kind+colour in distinct cells of a 3x3 grid."""
    cells = rng.choice(9, size=count, replace=False)
    combos = rng.choice(len(SHAPES) * len(COLOURS), size=count, replace=False)
    cell_w, cell_h = size[0] / 3, size[1] / 3
    placed = []
    for cell, index in zip(cells.tolist(), combos.tolist(), strict=True):
        radius = min(cell_w, cell_h) / 2 * rng.uniform(0.6, 0.8)
        slack_x, slack_y = cell_w / 2 - radius * 0.9, cell_h / 2 - radius * 0.9
        x = (cell % 3 + 0.5) * cell_w + rng.uniform(-slack_x, slack_x)
        y = (cell // 3 + 0.5) * cell_h + rng.uniform(-slack_y, slack_y)
        kind, colour = combo(index)
        placed.append(Placed(Shape(kind, colour, x, y, radius, rng.uniform(-15, 15)), cell))
    return placed


def caption(placed: Sequence[Placed]) -> str:
    """ "a red circle at the top left and a blue square in the centre"."""
    parts = [f"{with_article(p.shape.name)} {cell_phrase(p.cell)}" for p in placed]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_image(
    rng: np.random.Generator, placed: Sequence[Placed], size: tuple[int, int]
) -> Image.Image:
    return render_scene(random_background(rng, size), [p.shape for p in placed])


def single_shape_image(
    rng: np.random.Generator, kind: str, colour: str, style: str, size: tuple[int, int]
) -> Image.Image:
    """One large shape at a random spot: ``filled`` on a pale, ``outline`` on a dark ground."""
    width, height = size
    radius = min(size) * rng.uniform(0.22, 0.34)
    x = rng.uniform(radius + 2, width - radius - 2)
    y = rng.uniform(radius + 2, height - radius - 2)
    shape = Shape(kind, colour, x, y, radius, rng.uniform(-15, 15))
    dark = style == "outline"
    background = random_background(rng, size, dark=dark)
    add_clutter(rng, background, int(rng.integers(1, 4)))
    return render_scene(background, [shape], outline_width=4 if dark else 0)


# --------------------------------------------------------------------------- pages, digits


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font: the same glyphs on every machine, nothing to download."""
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class Page:
    """A visual document: a title, some "label: number" lines and their bar chart."""

    title: str
    lines: tuple[tuple[str, int], ...]
    header_colour: tuple[int, int, int]
    header_height: int
    chart_on_top: bool


PLACES = (
    "Elm Park", "Harbour Row", "North Meadow", "Stone Bridge", "Willow Bend", "Old Mill",
    "Lark Hill", "Fox Lane", "Cedar Court", "Mill Green", "Sandy Cove", "Kings Yard",
)  # fmt: skip


def random_page(rng: np.random.Generator, kind: str) -> Page:
    """A "<place> <kind> <year>" page counting 3-5 kinds of shapes of one colour, drawn in
    that colour (header and bars): a question about "red circles" is answered by a red page,
    a cue a small model can learn from pixels (it cannot read the numbers)."""
    title = f"{rng.choice(PLACES)} {kind} {int(rng.integers(1990, 2025))}"
    colour = random_colour(rng)
    shapes = rng.choice(len(SHAPES), size=int(rng.integers(3, 6)), replace=False)
    lines = tuple(
        (f"{colour} {plural(SHAPES[shape])}", int(rng.integers(2, 60))) for shape in shapes.tolist()
    )
    return Page(title, lines, COLOURS[colour], int(rng.integers(22, 40)), bool(rng.random() < 0.5))


def render_page(page: Page, size: tuple[int, int] = (200, 280)) -> Image.Image:
    """Draw a page: coloured header with the title, the lines, and a bar chart of the numbers."""
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, page.header_height), fill=page.header_colour)
    draw.text((8, page.header_height // 2 - 7), page.title, fill=(255, 255, 255), font=font(13))
    chart_top = page.header_height + 10 if page.chart_on_top else height - 100
    text_top = chart_top + 100 if page.chart_on_top else page.header_height + 12
    body = font(12)
    for i, (label, value) in enumerate(page.lines):
        draw.text((10, text_top + i * 17), f"{label}: {value}", fill=(20, 20, 20), font=body)
    values = [value for _, value in page.lines]
    _draw_bars(draw, values, (10, chart_top, width - 10, 85), page.header_colour)
    return image


def _draw_bars(
    draw: ImageDraw.ImageDraw,
    values: list[int],
    area: tuple[int, int, int, int],
    colour: tuple[int, int, int],
) -> None:
    left, top, right, chart_height = area
    slot = (right - left) / len(values)
    peak = max(values)
    for i, value in enumerate(values):
        bar = chart_height * value / peak
        x0 = left + i * slot + 3
        draw.rectangle(
            (x0, top + chart_height - bar, x0 + slot - 6, top + chart_height), fill=colour
        )
    draw.line((left, top + chart_height, right, top + chart_height), fill=(90, 90, 90), width=1)


def digit_image(pixels: np.ndarray, side: int = 56) -> Image.Image:
    """An 8x8 scikit-learn digit (values 0-16) as dark ink on white, upscaled without blur."""
    grey = 255 - np.round(np.asarray(pixels, np.float64) * 255 / 16).astype(np.uint8)
    small = Image.fromarray(grey.reshape(8, 8), "L")
    return small.resize((side, side), Image.Resampling.NEAREST).convert("RGB")


def brighter(image: Image.Image, amount: int) -> Image.Image:
    """A copy with every channel raised by ``amount``: a near-duplicate, not an exact one."""
    pixels = np.asarray(image.convert("RGB"), np.int16) + amount
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def heavy_blur(image: Image.Image, radius: float = 8.0) -> Image.Image:
    """A deliberately unusable, almost flat copy: the blur check must reject it."""
    return image.filter(ImageFilter.GaussianBlur(radius))


# --------------------------------------------------------------------------- encoding


def png_bytes(image: Image.Image) -> bytes:
    """PNG without timestamps or text chunks: same pixels, same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# Constant quantiser, one thread. With x264's default CRF rate control (macroblock tree)
# this build wrote different bytes for the same frames from one call to the next.
X264_OPTIONS = {"qp": "30", "preset": "fast", "x264-params": "threads=1:lookahead-threads=1"}


def mp4_bytes(frames: Sequence[Image.Image], fps: int) -> bytes:
    """H.264 (libx264, yuv420p) in MP4, the same bytes for the same frames."""
    width, height = frames[0].size
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


# --------------------------------------------------------------------------- videos


DIRECTIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    # Start and end of the centre, as fractions of the frame (x, y).
    "from left to right": ((0.15, 0.5), (0.85, 0.5)),
    "from right to left": ((0.85, 0.5), (0.15, 0.5)),
    "down": ((0.5, 0.2), (0.5, 0.8)),
    "up": ((0.5, 0.8), (0.5, 0.2)),
    "diagonally to the bottom right": ((0.2, 0.2), (0.8, 0.8)),
    "diagonally to the top left": ((0.8, 0.8), (0.2, 0.2)),
}


@dataclass(frozen=True)
class Motion:
    """One shape crossing a still background, maybe past shapes that stay put."""

    moving: Shape
    direction: str
    still: tuple[Shape, ...]
    background: Image.Image

    @property
    def caption(self) -> str:
        return f"{with_article(self.moving.name)} moves {self.direction}"

    def frames(self, seconds: float, fps: int) -> list[Image.Image]:
        count = round(seconds * fps)
        return motion_frames(self.background, self.moving, self.direction, count, self.still)


def random_motion(rng: np.random.Generator, size: tuple[int, int], still: int = 0) -> Motion:
    direction = str(rng.choice(list(DIRECTIONS)))
    placed = place_shapes(rng, size, still + 1)
    first = placed[0].shape
    moving = Shape(first.kind, first.colour, 0, 0, rng.uniform(9, 13), first.angle)
    background = random_background(rng, size)
    return Motion(moving, direction, tuple(p.shape for p in placed[1:]), background)


def motion_frames(
    background: Image.Image,
    moving: Shape,
    direction: str,
    count: int,
    still: Sequence[Shape] = (),
) -> list[Image.Image]:
    """Frames of ``moving`` travelling in ``direction`` across ``background``.

    The moving shape's own x/y are ignored; the direction gives its path. ``still`` shapes
    stay where they are, so a question like "which shape moves?" has one answer.
    """
    width, height = background.size
    (x0, y0), (x1, y1) = DIRECTIONS[direction]
    frames = []
    for i in range(count):
        t = i / max(count - 1, 1)
        x, y = (x0 + (x1 - x0) * t) * width, (y0 + (y1 - y0) * t) * height
        here = Shape(moving.kind, moving.colour, x, y, moving.radius, moving.angle)
        frames.append(render_scene(background, [*still, here]))
    return frames


# --------------------------------------------------------------------------- measures

# The generator keeps its images apart with the same measures the clean step applies.
laplacian_variance = media_ops.laplacian_variance
perceptual_hash = media_ops.perceptual_hash
hamming = media_ops.hamming

"""The HTTP contract of the embeddings endpoint, free of any server framework.

Requests follow the OpenAI embeddings API (``input`` a string or a list, ``model``,
``encoding_format`` float|base64, ``dimensions``, ``user``), extended with multimodal
items ``{"text", "image", "images", "video", "instruction"}``, a request-wide
``instruction`` and ``precision`` (``float``, ``int8``, ``uint8``, ``binary``,
``ubinary``: compact codes, ``rzenembed.compact``; the OpenAI SDK sends it through
``extra_body``). Everything is validated and every image decoded here, before any item
reaches a model replica: a bad request is answered 4xx with a message naming the field,
and nothing malformed ever joins a batch with other clients' items.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rzenembed.compact import PRECISIONS, Calibration, PrecisionError, compact
from rzenembed.config import ServeLimits
from rzenembed.data.storage import (
    NOT_ALLOWED,
    UnsafeURIError,
    allowed_location,
    shared_filesystem,
    storage_options,
)
from rzenembed.modeling.inputs import EmbedInput

REQUEST_FIELDS = {
    "input",
    "model",
    "encoding_format",
    "dimensions",
    "user",
    "instruction",
    "precision",
}
ITEM_FIELDS = {"text", "instruction", "image", "images", "video"}
ENCODINGS = ("float", "base64")


class RequestError(ValueError):
    """A request the endpoint refuses: HTTP ``status`` and the offending ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 503:
            kind = "unavailable"
        if self.status == 404:
            kind = "model_not_found"
        if self.status == 429:
            kind = "rate_limit_exceeded"
        if self.status == 504:
            kind = "timeout"
        return {"error": {"message": self.message, "type": kind, "param": self.param}}


@dataclass
class EmbeddingsRequest:
    items: list[EmbedInput]
    model: str | None
    encoding_format: str
    dimensions: int | None
    precision: str = "float"


class LocationReader:
    """Reads an image given by location, only from the allowed roots (the storage root
    and ``serve.media_roots``): a client can never make the server read anything else.

    One check decides (``rzenembed.data.storage.allowed_location``): ``file`` and ``s3``
    only, no chained URL, inside a root after normalisation (``..`` resolved) and, on a
    local disk, after following links. The file is then read through the filesystem object of
    its root's store (built once per store here, never from the client's string). Every
    refusal, a missing file included, reads ``not an allowed location``: the answer names
    no root and does not tell whether something exists there. ``enabled`` False (a public
    endpoint: ``serve.allow_locations: false``) refuses every location."""

    def __init__(self, roots: Sequence[str], endpoint_url: str | None = None, enabled: bool = True):
        self.roots = [r if "://" in r else str(Path(r).resolve()) for r in roots if r]
        self.endpoint_url = endpoint_url
        self.enabled = enabled

    def read(self, location: str, param: str, limit: int) -> bytes:
        """The bytes at ``location`` (``s3://...``, ``file:///...`` or an absolute path)
        when it lies under a root; 400 otherwise, 413 when it is over ``limit``."""
        refused = RequestError(f"{param}: {NOT_ALLOWED}", param)
        if not self.enabled:
            raise RequestError(
                f"{param}: image locations are turned off on this endpoint; send the image "
                "as base64 or a data URL",
                param,
            )
        try:
            uri = allowed_location(location, self.roots)
        except UnsafeURIError:
            raise refused from None
        scheme, path = uri.split("://", 1) if "://" in uri else ("file", uri)
        fs = shared_filesystem(scheme, self._endpoint(scheme))
        try:
            size = fs.size(path)
            if size > limit:
                raise RequestError(
                    f"{param}: the image is {size} bytes, more than the {limit} allowed", param, 413
                )
            return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError, OSError):
            raise refused from None

    def _endpoint(self, scheme: str) -> str | None:
        if scheme != "s3":
            return None
        options = storage_options("s3://", self.endpoint_url)
        return options.get("client_kwargs", {}).get("endpoint_url")


class PixelBudget:
    """The declared pixels one request may still decode (``limits.max_request_pixels``)."""

    def __init__(self, limit: int):
        self.left = limit
        self.limit = limit

    def spend(self, pixels: int, param: str) -> None:
        self.left -= pixels
        if self.left < 0:
            raise RequestError(
                f"{param}: the request's images and frames declare more than the "
                f"{self.limit} pixels one request may decode",
                param,
                413,
            )


def parse_body(body: bytes, limits: ServeLimits) -> dict[str, Any]:
    if len(body) > limits.max_request_bytes:
        raise RequestError(
            f"request body is {len(body)} bytes, more than the {limits.max_request_bytes} allowed",
            None,
            413,
        )
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    return data


def parse_request(
    data: dict[str, Any], limits: ServeLimits, reader: LocationReader
) -> EmbeddingsRequest:
    """Validate an embeddings request and decode its media into ``EmbedInput`` items."""
    unknown = sorted(set(data) - REQUEST_FIELDS)
    if unknown:
        raise RequestError(
            f"unknown field(s) {unknown}; accepted: {sorted(REQUEST_FIELDS)}", unknown[0]
        )
    if "input" not in data:
        raise RequestError("'input' is required", "input")
    encoding = data.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise RequestError(
            f"encoding_format must be one of {list(ENCODINGS)}, got {encoding!r}",
            "encoding_format",
        )
    dimensions = data.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise RequestError(
            f"dimensions must be a positive integer, got {dimensions!r}", "dimensions"
        )
    precision = data.get("precision") or "float"
    if precision not in PRECISIONS:
        raise RequestError(
            f"precision must be one of {list(PRECISIONS)}, got {precision!r}", "precision"
        )
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", "model")
    instruction = data.get("instruction", "")
    if not isinstance(instruction, str):
        raise RequestError("instruction must be a string", "instruction")
    raw = data["input"]
    raw = [raw] if isinstance(raw, str | dict) else raw
    if not isinstance(raw, list) or not raw:
        raise RequestError("input must be a non-empty string, object or list", "input")
    if len(raw) > limits.max_items:
        raise RequestError(
            f"input has {len(raw)} items, more than the {limits.max_items} allowed",
            "input",
            413,
        )
    budget = PixelBudget(limits.max_request_pixels)
    items = [
        _item(value, f"input[{i}]", instruction, limits, reader, budget)
        for i, value in enumerate(raw)
    ]
    return EmbeddingsRequest(items, model, encoding, dimensions, precision)


def _text(value: Any, param: str, limits: ServeLimits) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{param} must be a string", param)
    if len(value) > limits.max_text_chars:
        raise RequestError(
            f"{param} has {len(value)} characters, more than the {limits.max_text_chars} allowed",
            param,
            413,
        )
    return value


def _item(
    value: Any,
    param: str,
    instruction: str,
    limits: ServeLimits,
    reader: LocationReader,
    budget: PixelBudget | None = None,
) -> EmbedInput:
    if isinstance(value, str):
        if not value.strip():
            raise RequestError(f"{param} is an empty string", param)
        return EmbedInput(text=_text(value, param, limits), instruction=instruction)
    if isinstance(value, int | float | list):
        raise RequestError(
            f"{param}: token-id inputs are not supported; send text or an item object", param
        )
    if not isinstance(value, dict):
        raise RequestError(f"{param} must be a string or an object", param)
    unknown = sorted(set(value) - ITEM_FIELDS)
    if unknown:
        raise RequestError(
            f"{param} has unknown field(s) {unknown}; accepted: {sorted(ITEM_FIELDS)}",
            f"{param}.{unknown[0]}",
        )
    if "image" in value and "images" in value:
        raise RequestError(f"{param}: give 'image' or 'images', not both", f"{param}.images")
    text = _text(value.get("text", ""), f"{param}.text", limits)
    own = _text(value.get("instruction", instruction), f"{param}.instruction", limits)
    images = value.get("images", [value["image"]] if "image" in value else [])
    if not isinstance(images, list):
        raise RequestError(f"{param}.images must be a list", f"{param}.images")
    if len(images) > limits.max_images_per_item:
        raise RequestError(
            f"{param}.images has {len(images)} images, more than the "
            f"{limits.max_images_per_item} allowed",
            f"{param}.images",
            413,
        )
    decoded = [
        decode_image(
            v,
            f"{param}.images[{j}]" if "images" in value else f"{param}.image",
            limits,
            reader,
            budget,
        )
        for j, v in enumerate(images)
    ]
    video = None
    if "video" in value:
        frames = value["video"]
        if not isinstance(frames, list) or not frames:
            raise RequestError(
                f"{param}.video must be a non-empty list of frames", f"{param}.video"
            )
        if len(frames) > limits.max_video_frames:
            raise RequestError(
                f"{param}.video has {len(frames)} frames, more than the "
                f"{limits.max_video_frames} allowed",
                f"{param}.video",
                413,
            )
        video = [
            decode_image(f, f"{param}.video[{k}]", limits, reader, budget)
            for k, f in enumerate(frames)
        ]
    if not (text.strip() or decoded or video):
        raise RequestError(f"{param} has no text, image or video", param)
    return EmbedInput(text=text, instruction=own, images=decoded, video=video)


def decode_image(
    value: Any,
    param: str,
    limits: ServeLimits,
    reader: LocationReader,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """An RGB (height, width, 3) uint8 array from base64 data (bare or a ``data:`` URL) or
    a location under the allowed roots; checked against the byte and pixel limits (the
    image's and the request's) before the pixels are decoded, and decoded at a reduced
    scale when it is much larger than the model will see (``reduced``)."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{param} must be a non-empty string (base64 data or a location)", param)
    data = _image_bytes(value, param, limits, reader)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise RequestError(
                    f"{param} is {width}x{height} pixels, more than the "
                    f"{limits.max_image_pixels} allowed",
                    param,
                    413,
                )
            if budget is not None:
                budget.spend(width * height, param)
            return np.asarray(reduced(image, limits.decode_max_pixels).convert("RGB"))
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(
            f"{param} could not be decoded as an image (not a format the server reads: "
            f"PNG, JPEG, WebP, GIF, BMP, TIFF)",
            param,
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(f"{param} could not be decoded as an image: {exc}", param) from None


def reduced(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` decoded at the smallest power-of-two reduction that keeps at least
    ``max_pixels`` pixels (JPEG: the decoder's own draft mode, never the full size in
    memory; other formats: ``Image.reduce`` after decoding): the processor resizes it to
    the model's budget anyway, from at least that many pixels. Unchanged when it is not
    twice over the budget or ``max_pixels`` is 0."""
    width, height = image.size
    if not max_pixels or width * height < 4 * max_pixels:
        return image
    factor = 1
    while (width // (2 * factor)) * (height // (2 * factor)) >= max_pixels and factor < 8:
        factor *= 2
    if factor == 1:
        return image
    if image.format == "JPEG":
        image.draft("RGB", (width // factor, height // factor))
        return image
    return image.reduce(factor)


def _image_bytes(value: str, param: str, limits: ServeLimits, reader: LocationReader) -> bytes:
    payload = value
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(f"{param}: a data URL must be data:<type>;base64,<data>", param)
    elif "://" in value:  # base64 never holds ':' (a JPEG's even starts with '/')
        return reader.read(value, param, limits.max_image_bytes)
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(
            f"{param} holds about {len(payload) * 3 // 4} bytes, more than the "
            f"{limits.max_image_bytes} allowed",
            param,
            413,
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            f"{param} is not valid base64 (nor a data URL or location)", param
        ) from None


def encode_vector(vector: np.ndarray, encoding: str) -> list[float] | list[int] | str:
    """A vector as JSON numbers (floats, or the integers of int8/uint8/packed-bit codes), or
    (``base64``) its bytes: little-endian float32 for floats, one byte per code otherwise."""
    if encoding == "base64":
        raw = vector.astype("<f4") if vector.dtype.kind == "f" else vector
        return base64.b64encode(raw.tobytes()).decode("ascii")
    if vector.dtype.kind == "f":
        return vector.astype(np.float32).tolist()
    return vector.tolist()


def decode_vector(value: list[float] | list[int] | str, precision: str = "float") -> np.ndarray:
    """The inverse of ``encode_vector`` (for clients and tests)."""
    dtype = {"float": "<f4", "int8": np.int8, "binary": np.int8}.get(precision, np.uint8)
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype=dtype).copy()
    return np.asarray(value, dtype=dtype)


def embeddings_response(
    vectors: np.ndarray,
    tokens: Sequence[int],
    request: EmbeddingsRequest,
    model: dict[str, Any],
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """The OpenAI-shaped response, plus an ``rzenembed`` object naming the exact version
    and digest that produced the vectors. ``calibration``: the served model's int8/uint8
    ranges (``quantization.json``), needed only for those precisions."""
    if request.dimensions is not None and request.dimensions > vectors.shape[1]:
        raise RequestError(
            f"dimensions {request.dimensions} is more than the model's {vectors.shape[1]}",
            "dimensions",
        )
    try:
        out = compact(vectors, request.dimensions, request.precision, calibration)
    except PrecisionError as exc:
        param = "precision" if calibration is None else "dimensions"
        raise RequestError(str(exc), param) from None
    total = int(sum(tokens))
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_vector(v, request.encoding_format),
            }
            for i, v in enumerate(out)
        ],
        "model": model["name"],
        "usage": {"prompt_tokens": total, "total_tokens": total},
        "rzenembed": {
            **{k: model.get(k) for k in ("version", "digest", "uri", "dimensions")},
            "precision": request.precision,
        },
    }


def check_model_name(asked: str | None, model: dict[str, Any], any_version: bool = False) -> None:
    """A request may name the served model (name, ``name/version``, ``name@alias`` or the
    URI it was asked as) or nothing; any other name is a 404, not a silent substitute.
    ``any_version``: accept ``name/<any version>`` (the check before embedding, against what
    the endpoint last served; the exact check runs on the version that answered)."""
    if asked is None:
        return
    if any_version and asked.removeprefix("models:/").split("/")[0] == model["name"]:
        return
    accepted = {model["name"], model["uri"], f"models:/{model['name']}"}
    if model.get("version"):
        accepted.add(f"{model['name']}/{model['version']}")
        accepted.add(f"models:/{model['name']}/{model['version']}")
    if "@" in model["uri"]:
        accepted.add(model["uri"].removeprefix("models:/"))
    if asked not in accepted:
        raise RequestError(
            f"model {asked!r} is not served here; this endpoint serves {sorted(accepted)}",
            "model",
            404,
        )


def check_precision(request: EmbeddingsRequest, model: dict[str, Any]) -> None:
    """A precision the served model cannot give (int8/uint8 without a calibration) is a
    400 naming ``precision`` before anything is embedded."""
    offered = model.get("precisions", PRECISIONS)
    if request.precision not in offered:
        raise RequestError(
            f"precision {request.precision!r} needs a calibration this model does not have; "
            f"it offers {list(offered)}",
            "precision",
        )


def models_listing(model: dict[str, Any]) -> dict[str, Any]:
    """``GET /v1/models``: the one served model, with its version, digest and template."""
    return {
        "object": "list",
        "data": [{"id": model["name"], "object": "model", "owned_by": "rzenembed", **model}],
    }


def chunks(items: list[EmbedInput], size: int) -> list[list[EmbedInput]]:
    """Consecutive runs of at most ``size`` items (one batched call each)."""
    return [items[i : i + size] for i in range(0, len(items), size)]

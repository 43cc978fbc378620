"""What one request may make the server decode and hold: images per item, the declared
pixels of the whole request (checked before any pixel is decoded), and images far larger
than the model's budget decoded at a reduced scale."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from rzenembed.config import ServeLimits
from rzenembed.serving.protocol import LocationReader, RequestError, parse_request, reduced


def encoded(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    options = {"quality": 90} if fmt == "JPEG" else {}
    image.save(buffer, format=fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def white_6000() -> str:
    """A 117 KB PNG that declares 36M pixels (108 MB once decoded in full)."""
    return encoded(Image.new("RGB", (6000, 6000), "white"))


def parse(body: dict, **limits) -> object:
    return parse_request(body, ServeLimits(**limits), LocationReader([]))


def test_images_per_item_are_capped(white_6000):
    small = encoded(Image.new("RGB", (32, 32), "red"))
    with pytest.raises(RequestError) as error:
        parse({"input": [{"images": [small] * 5}]}, max_images_per_item=4)
    assert error.value.status == 413 and error.value.param == "input[0].images"
    assert "5 images, more than the 4 allowed" in str(error.value)


def test_the_request_pixel_budget_stops_before_decoding_past_it(white_6000):
    body = {"input": [{"image": white_6000}, {"image": white_6000}]}
    with pytest.raises(RequestError) as error:
        parse(body, max_request_pixels=50_000_000)
    assert error.value.status == 413 and error.value.param == "input[1].image"
    assert "more than the 50000000 pixels one request may decode" in str(error.value)


def test_images_far_over_the_models_budget_are_decoded_reduced(white_6000):
    (item,) = parse({"input": [{"image": white_6000}]}).items
    assert item.images[0].shape == (1500, 1500, 3)  # 6000 / 4: still >= 1280 x 28 x 28
    photo = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
    )
    with Image.open(io.BytesIO(base64.b64decode(encoded(photo, "JPEG")))) as jpeg:
        small = reduced(jpeg, 1280 * 28 * 28)
        assert small.size == (2000, 1500)  # the decoder's own draft: never 12M pixels
    assert reduced(Image.new("RGB", (1200, 900)), 1280 * 28 * 28).size == (1200, 900)


def test_an_image_within_the_budget_is_decoded_exactly():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (84, 112, 3), np.uint8))
    (item,) = parse({"input": [{"image": encoded(image)}]}).items
    np.testing.assert_array_equal(item.images[0], np.asarray(image))

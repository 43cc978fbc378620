"""The embeddings endpoint on a real Ray Serve, with the tiny model registered in a real
SQLite MLflow registry, driven over HTTP by a real client."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from rzenembed.compact import CALIBRATION_FILE, Calibration, calibrate, compact
from rzenembed.config import config_from_dict
from rzenembed.modeling import RzenEmbedder
from rzenembed.modeling.digest import model_digest
from rzenembed.modeling.inputs import EmbedInput
from rzenembed.serving.auth import new_key
from rzenembed.serving.protocol import decode_vector
from rzenembed.tracking import Tracker
from tests.conftest import random_image

NAME = "rz-serve"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _register(tracker: Tracker, folder, digest: str) -> str:
    run = tracker.start_step(None, "soup", "soup", {})
    model_id = tracker.log_model(run, "souped", folder, "souped-model", {}, {}, upload=False)
    version, _ = tracker.register(model_id, run, digest, {})
    return version


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir, tiny_model_config):
    """Two registered versions of the tiny model (v2 with perturbed weights), champion v1."""
    root = tmp_path_factory.mktemp("serving")
    folders = []
    for i in range(2):
        embedder = RzenEmbedder.from_pretrained(tiny_model_dir, config=tiny_model_config)
        if i:
            with torch.no_grad():
                for p in embedder.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        # v1 says it was trained for nested sizes and carries an int8 calibration (on a
        # few captions' embeddings), as a registered demo model does.
        extra = {} if i else {"matryoshka": {"dims": [8, 16, 32, 64]}}
        folder = embedder.save_pretrained(root / "data" / "models" / f"m{i + 1}", extra)
        if not i:
            texts = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")]
            vectors = embedder.encode([EmbedInput(text=t) for t in texts]).numpy()
            (folder / CALIBRATION_FILE).write_text(calibrate(vectors, [8, 16, 32]).dumps())
        folders.append(folder)
    (root / "data" / "media").mkdir()
    random_image(7).save(root / "data" / "media" / "stored.png")
    key = new_key(root / "api-keys", label="the tests")
    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "storage": {"root": str(root / "data")},
            "tracking": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "registered_model": NAME,
                "upload_models": False,
            },
            "serve": {
                "port": _free_port(),
                "num_cpus": 0,
                "api_num_cpus": 0,
                "max_batch_size": 4,
                "batch_wait_timeout_s": 0.02,
                "poll_interval_s": 1.0,
                "limits": {
                    "max_image_pixels": 300 * 300,
                    "max_items": 8,
                    "max_request_bytes": 2**20,
                },
                "auth": "keys",
                "api_keys_file": str(root / "api-keys"),
            },
        }
    )
    tracker = Tracker(cfg.tracking)
    digests = [model_digest(str(f)) for f in folders]
    versions = [_register(tracker, f, d) for f, d in zip(folders, digests, strict=True)]
    tracker.client.set_registered_model_alias(NAME, "champion", versions[0])
    return {
        "cfg": cfg,
        "tracker": tracker,
        "folders": folders,
        "digests": digests,
        "versions": versions,
        "root": root,
        "key": key,
    }


@pytest.fixture(scope="module")
def server(ray_local, registry):
    from ray import serve

    from rzenembed.serving.follow import RegistryFollower

    follower = RegistryFollower(registry["cfg"], f"models:/{NAME}@champion")
    follower.start()
    url = f"http://127.0.0.1:{registry['cfg'].serve.port}"
    auth = {"Authorization": f"Bearer {registry['key']}"}
    yield {"url": url, "follower": follower, "auth": auth}
    serve.shutdown()


def _post(server, body, timeout=60):
    return requests.post(
        server["url"] + "/v1/embeddings", json=body, headers=server["auth"], timeout=timeout
    )


def _get(server, path, timeout=30):
    return requests.get(server["url"] + path, headers=server["auth"], timeout=timeout)


def replicas(cfg, deployment: str) -> set[str]:
    """The live replica actors of one deployment of the served application: a restarted
    replica is a new actor with a new name."""
    import ray

    prefix = f"SERVE_REPLICA::{cfg.serve.app_name}#{deployment}#"
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in named if a["name"].startswith(prefix)}


def _scrape(server) -> dict[tuple[str, tuple], float]:
    """``/metrics`` parsed, once every HTTP replica's last requests are on the board (each
    sends its counters at most ``PUSH_EVERY_S`` after a request)."""
    from prometheus_client.parser import text_string_to_metric_families

    from rzenembed.serving.metrics import PUSH_EVERY_S

    time.sleep(PUSH_EVERY_S + 1.0)
    response = _get(server, "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _answered(values: dict[tuple[str, tuple], float]) -> float:
    return sum(v for (name, _), v in values.items() if name == "rzenembed_requests_total")


def _vectors(response) -> np.ndarray:
    return np.stack([decode_vector(d["embedding"]) for d in response.json()["data"]])


@pytest.fixture(scope="module")
def reference(registry):
    """Version 1 loaded in this process: what the endpoint must reproduce."""
    return RzenEmbedder.from_pretrained(registry["folders"][0])


def test_endpoint_matches_encode_for_text_images_and_mixed_items(server, registry, reference):
    image_a, image_b = random_image(1), random_image(2, (64, 96))
    frames = [random_image(10 + k, (56, 56)) for k in range(4)]
    stored = registry["root"] / "data" / "media" / "stored.png"
    requests_and_inputs = [
        # OpenAI text: a string, and a list of strings with a request-wide instruction.
        ({"input": "a red bicycle"}, [EmbedInput(text="a red bicycle")]),
        (
            {"input": ["first", "second text"], "instruction": "Find the caption."},
            [EmbedInput(text=t, instruction="Find the caption.") for t in ("first", "second text")],
        ),
        # Multimodal items: an image, an image with text, a data URL, a stored image, a video.
        (
            {
                "input": [
                    {"image": _png(image_a)},
                    {"text": "what is shown", "image": _png(image_b), "instruction": "Answer."},
                    {"images": ["data:image/png;base64," + _png(image_a)], "text": "page"},
                    {"image": f"file://{stored}"},
                    {"video": [_png(f) for f in frames], "text": "a clip"},
                    "plain text among images",
                ]
            },
            [
                EmbedInput(images=[np.asarray(image_a)]),
                EmbedInput(
                    text="what is shown", instruction="Answer.", images=[np.asarray(image_b)]
                ),
                EmbedInput(text="page", images=[np.asarray(image_a)]),
                EmbedInput(images=[str(stored)]),
                EmbedInput(text="a clip", video=[np.asarray(f) for f in frames]),
                EmbedInput(text="plain text among images"),
            ],
        ),
    ]
    for body, inputs in requests_and_inputs:
        response = _post(server, body)
        assert response.status_code == 200, response.text
        got = _vectors(response)
        want = reference.encode(inputs, batch_size=2).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        payload = response.json()
        assert [d["index"] for d in payload["data"]] == list(range(len(inputs)))
        assert payload["model"] == NAME
        assert payload["rzenembed"]["digest"] == registry["digests"][0]
        assert payload["rzenembed"]["version"] == registry["versions"][0]
        assert payload["usage"]["prompt_tokens"] > 0
        assert response.headers["x-rzenembed-digest"] == registry["digests"][0]

    # base64 (little-endian float32) and a truncated, renormalised prefix.
    full = reference.encode([EmbedInput(text="dims")]).numpy()[0]
    response = _post(server, {"input": "dims", "encoding_format": "base64", "dimensions": 8})
    assert response.status_code == 200, response.text
    encoded = response.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    got = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_allclose(got, full[:8] / np.linalg.norm(full[:8]), atol=1e-5)
    assert abs(np.linalg.norm(got) - 1.0) < 1e-5


def test_malformed_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server, registry):
    big = random_image(3, (320, 320))  # 102,400 pixels > the 90,000 allowed
    outside = registry["root"] / "elsewhere.png"
    random_image(4).save(outside)
    cases = [
        ({"input": [{"image": "not base64!!"}]}, 400, "input[0].image", "base64"),
        ({"input": [{"image": _png(big)}]}, 413, "input[0].image", "pixels"),
        (
            {"input": [{"image": base64.b64encode(b"no image here").decode()}]},
            400,
            "input[0].image",
            "decoded",
        ),
        ({"input": []}, 400, "input", "non-empty"),
        ({"input": ""}, 400, "input[0]", "empty"),
        ({"input": "x", "colour": "red"}, 400, "colour", "unknown"),
        ({"input": [{"text": "x", "audio": "..."}]}, 400, "input[0].audio", "unknown"),
        ({"input": ["a"] * 9}, 413, "input", "9 items"),
        ({"input": [[1, 2, 3]]}, 400, "input[0]", "token-id"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", "float"),
        ({"input": "x", "dimensions": 0}, 400, "dimensions", "positive"),
        ({"input": "x", "dimensions": 100000}, 400, "dimensions", "more than"),
        ({"input": "x", "model": "someone-else"}, 404, "model", "not served"),
        ({"input": [{"video": []}]}, 400, "input[0].video", "non-empty"),
        ({"input": "x" * (2 * 2**20)}, 413, None, "request body"),  # refused while read
    ]
    # Locations that would leave the roots: every one refused alike, naming nothing.
    media = registry["root"] / "data" / "media"
    (media / "link.png").unlink(missing_ok=True)
    (media / "link.png").symlink_to(outside)
    escapes = [
        f"file://{outside}",
        f"zip://{media}/stored.png::{outside}",
        f"tar://{media}/stored.png::/etc/passwd",
        f"file://{media}/stored.png::file:///etc/passwd",
        "file:///etc/passwd",
        f"file://{media}/link.png",
        f"file://{media}/../../elsewhere.png",
        f"file://{media}/missing.png",
        "http://127.0.0.1:9/image.png",
        "file://media/stored.png",
    ]
    for location in escapes:
        cases.append(({"input": [{"image": location}]}, 400, "input[0].image", "not an allowed"))
    for body, status, param, words in cases:
        response = _post(server, body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (body, error)
        assert words in error["message"], (body, error)
        if words == "not an allowed":  # the same answer whatever was asked
            assert error["message"] == "input[0].image: not an allowed location", error
    response = requests.post(
        server["url"] + "/v1/embeddings", data=b"{not json", headers=server["auth"], timeout=30
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    # Still serving, and a named model is accepted in each of its spellings.
    for model in (NAME, f"{NAME}/{registry['versions'][0]}", f"models:/{NAME}@champion", None):
        response = _post(server, {"input": "still here", "model": model})
        assert response.status_code == 200, response.text


def test_without_the_right_key_every_route_but_health_is_401(server):
    for headers in ({}, {"Authorization": "Bearer rz-not-a-key"}, {"Authorization": "Basic x"}):
        for method, path in (("post", "/v1/embeddings"), ("get", "/v1/models")):
            response = requests.request(
                method, server["url"] + path, json={"input": "x"}, headers=headers, timeout=30
            )
            assert response.status_code == 401, (path, headers, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            assert response.headers["www-authenticate"] == "Bearer"
    assert requests.get(server["url"] + "/healthz", timeout=30).status_code == 200


def test_the_openai_sdk_with_the_key_embeds_text_in_base64_and_dimensions(
    server, registry, reference
):
    """The OpenAI Python SDK asks for base64 by default and decodes it; ``dimensions``
    comes back truncated and renormalised."""
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=registry["key"])
    texts = ["a red circle", "two blue squares"]
    answer = client.embeddings.create(model=NAME, input=texts)
    want = reference.encode([EmbedInput(text=t) for t in texts]).numpy()
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    short = client.embeddings.create(model=NAME, input=texts[0], dimensions=8).data[0].embedding
    np.testing.assert_allclose(short, want[0, :8] / np.linalg.norm(want[0, :8]), atol=1e-5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="rz-wrong").embeddings.create(
            model=NAME, input="x"
        )


def test_the_openai_sdk_gets_int8_and_binary_codes_at_a_trained_size(server, registry, reference):
    """``precision`` through the SDK's ``extra_body``: int8 codes of 16 values and binary
    codes of 16 bits (2 bytes) at a trained size, equal to the codes made here from the
    same model and its calibration; ``encoding_format="float"`` because the SDK decodes
    base64 as float32. An unknown precision is a 400 naming the field."""
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=registry["key"])
    texts = ["a red circle", "two blue squares"]
    want = reference.encode([EmbedInput(text=t) for t in texts]).numpy()
    calibration = Calibration.loads((registry["folders"][0] / CALIBRATION_FILE).read_text())
    for precision, size in (("int8", 16), ("binary", 2), ("uint8", 16), ("ubinary", 2)):
        answer = client.embeddings.create(
            model=NAME,
            input=texts,
            dimensions=16,
            encoding_format="float",
            extra_body={"precision": precision},
        )
        got = np.array([d.embedding for d in answer.data])
        expected = compact(want, 16, precision, calibration).astype(np.int64)
        assert got.shape == (2, size), (precision, got.shape)
        # The endpoint's float vectors match these to 1e-5: a code may sit on a rounding
        # edge and move by one level, never more.
        assert np.abs(got - expected).max() <= 1, (precision, got, expected)
        assert (got == expected).mean() >= 0.9, (precision, got, expected)
    raw = _post(server, {"input": texts[0], "precision": "int8", "encoding_format": "base64"})
    assert raw.status_code == 200 and raw.json()["rzenembed"]["precision"] == "int8"
    assert len(base64.b64decode(raw.json()["data"][0]["embedding"])) == 64  # 64 bytes
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=NAME, input="x", extra_body={"precision": "fp4"})
    assert refused.value.body["param"] == "precision"
    uncalibrated = _post(server, {"input": "x", "precision": "int8", "dimensions": 12})
    assert uncalibrated.status_code == 400
    assert uncalibrated.json()["error"]["param"] == "dimensions"


def test_models_and_health_name_the_served_version(server, registry):
    listing = _get(server, "/v1/models").json()
    (entry,) = listing["data"]
    assert entry["id"] == NAME and entry["object"] == "model"
    assert entry["version"] == registry["versions"][0]
    assert entry["digest"] == registry["digests"][0]
    assert entry["template"] == "rzenembed-paper" and entry["dimensions"] == 64
    assert entry["trained_dimensions"] == [8, 16, 32, 64]
    assert entry["calibrated_dimensions"] == [8, 16, 32, 64]
    assert entry["precisions"] == ["float", "int8", "uint8", "binary", "ubinary"]
    health = requests.get(server["url"] + "/healthz", timeout=30)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_moving_champion_rolls_the_endpoint_without_failed_requests(server, registry):
    tracker, versions, digests = registry["tracker"], registry["versions"], registry["digests"]
    poll = registry["cfg"].serve.poll_interval_s
    follower = server["follower"]
    stop_client, stop_follow = threading.Event(), threading.Event()
    answers: list[tuple[float, int, str | None]] = []

    def client() -> None:
        while not stop_client.is_set():
            try:
                r = _post(server, {"input": ["loop", {"image": _png(random_image(5))}]}, 30)
                digest = r.json().get("rzenembed", {}).get("digest") if r.ok else None
                answers.append((time.time(), r.status_code, digest))
            except requests.RequestException as exc:
                answers.append((time.time(), -1, repr(exc)))

    def wait_for(digest: str, moved: float, timeout: float = 120.0) -> float:
        while time.time() - moved < timeout:
            recent = [a for a in answers if a[0] > moved]
            if recent and recent[-1][2] == digest:
                return next(t for t, _, d in recent if d == digest) - moved
            time.sleep(0.2)
        raise AssertionError(f"endpoint never switched to {digest[:12]}")

    # Each registry look the follower makes: (when it started and ended, the digest found).
    looks: list[tuple[float, float, str]] = []
    resolve = follower.resolve

    def looked():
        started = time.time()
        found = resolve()
        looks.append((started, time.time(), found.digest))
        return found

    follower.resolve = looked
    front = replicas(registry["cfg"], "EmbeddingsAPI")
    assert len(front) == 2  # serve.api_replicas
    threads = [threading.Thread(target=client) for _ in range(2)]
    watcher = threading.Thread(target=follower.follow, args=(stop_follow,))
    for t in [*threads, watcher]:
        t.start()
    try:
        time.sleep(2 * poll)
        switches = []
        for version, digest in ((versions[1], digests[1]), (versions[0], digests[0])):
            moved = time.time()  # promote, then roll back by moving the alias back
            tracker.client.set_registered_model_alias(NAME, "champion", version)
            stored = time.time()  # the registry holds the new alias from here on
            switched = wait_for(digest, moved)
            rollout = follower.rollouts[-1]
            assert rollout.digest == digest
            while rollout.deploy_s is None:  # old replicas still draining
                time.sleep(0.2)
            # Pinned to a version: that version's vectors, or a 404 naming what is served.
            pinned = _post(server, {"input": "pinned", "model": f"{NAME}/{version}"})
            assert pinned.status_code == 200 and pinned.json()["rzenembed"]["digest"] == digest
            other = versions[0] if version == versions[1] else versions[1]
            stale = _post(server, {"input": "pinned", "model": f"{NAME}/{other}"})
            assert stale.status_code == 404, stale.text
            # The alias is found by the first look after it moved (or by one that began
            # while it was being stored): no look begun after it was stored found the old
            # version, and the finding look began one poll interval after the previous one
            # ended (a look's own time, a registry query, is the machine's: seconds on two
            # loaded cores). The switch follows as soon as the new replicas are healthy.
            found = next(n for n, look in enumerate(looks) if look[0] > moved and look[2] == digest)
            assert not [look for look in looks[:found] if look[0] > stored], looks[-4:]
            assert looks[found][0] - looks[found - 1][1] <= poll + 1.0, looks[found - 1 :]
            seen = rollout.seen_at - moved
            assert switched <= seen + rollout.deploy_s + 2.0, (switched, rollout)
            switches.append(switched)
            time.sleep(1.0)
    finally:
        stop_client.set()
        stop_follow.set()
        for t in [*threads, watcher]:
            t.join(timeout=60)
        follower.resolve = resolve
    failed = [a for a in answers if a[1] != 200]
    assert not failed, failed[:5]
    assert len(answers) > 10
    # Every answer names one of the two versions, and after the rollback only the first.
    assert {d for _, _, d in answers} <= set(digests)
    assert answers[-1][2] == digests[0]
    listing = _get(server, "/v1/models").json()
    assert listing["data"][0]["version"] == versions[0]
    # Two rollouts replaced the model replicas, never the HTTP front.
    assert replicas(registry["cfg"], "EmbeddingsAPI") == front


def test_a_restarted_follower_adopts_the_running_endpoint(server, registry):
    from rzenembed.serving.follow import RegistryFollower

    again = RegistryFollower(registry["cfg"], f"models:/{NAME}@champion")
    rollout = again.start()
    assert rollout.deploy_s == 0.0 and rollout.digest == registry["digests"][0]
    assert again.poll() is None  # the alias has not moved


def test_the_same_content_under_another_version_restarts_nothing(server, registry):
    """An alias moved to another registry version of the served content (registered by
    hand: the pipeline reuses the version of a digest) renames the running replicas: no
    actor restarts, responses and pinned requests name the new version."""
    from rzenembed.tracking import DIGEST_TAG, process_tracking_uri

    cfg, tracker, follower = registry["cfg"], registry["tracker"], server["follower"]
    first = tracker.client.get_model_version(NAME, registry["versions"][0])
    before = {d: replicas(cfg, d) for d in ("EmbeddingsAPI", "EmbeddingModel")}
    assert all(before.values())
    with process_tracking_uri(cfg.tracking.tracking_uri):  # a models:/ source resolves there
        copy = tracker.client.create_model_version(
            NAME,
            source=first.source,
            model_id=first.tags["rzenembed.model_id"],
            tags={k: v for k, v in first.tags.items() if k in (DIGEST_TAG, "rzenembed.model_id")},
        )
    copy = str(copy.version)
    tracker.client.set_registered_model_alias(NAME, "champion", copy)
    try:
        rollout = follower.poll()
        assert rollout is not None and rollout.error is None and rollout.version == copy
        assert {d: replicas(cfg, d) for d in before} == before
        assert _get(server, "/v1/models").json()["data"][0]["version"] == copy
        pinned = _post(server, {"input": "renamed", "model": f"{NAME}/{copy}"})
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["rzenembed"]["digest"] == registry["digests"][0]
        stale = _post(server, {"input": "renamed", "model": f"{NAME}/{first.version}"})
        assert stale.status_code == 404, stale.text
    finally:
        tracker.client.set_registered_model_alias(NAME, "champion", first.version)
    assert follower.poll().version == str(first.version)  # renamed back, in place again
    assert {d: replicas(cfg, d) for d in before} == before


def test_a_front_setting_restarts_the_front_only(server, registry):
    """A change that only the HTTP front reads (a limit) replaces the front's replicas and
    leaves the loaded model replicas alone; deploying the same settings again is a no-op."""
    from rzenembed.serving.app import deploy

    cfg, served = registry["cfg"], server["follower"].served
    before = {d: replicas(cfg, d) for d in ("EmbeddingsAPI", "EmbeddingModel")}
    answered = _answered(_scrape(server))
    assert answered > 0
    limits = cfg.serve.limits.model_copy(update={"max_items": 9})
    changed = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"limits": limits})})
    try:
        assert deploy(changed, served) > 0
        assert replicas(cfg, "EmbeddingModel") == before["EmbeddingModel"]
        assert not replicas(cfg, "EmbeddingsAPI") & before["EmbeddingsAPI"]
        too_many = _post(server, {"input": ["x"] * 10})
        assert too_many.status_code == 413, too_many.text
        assert "more than the 9 allowed" in too_many.json()["error"]["message"]
        # The replaced replicas' counts stay on the board: the totals never go back.
        assert _answered(_scrape(server)) >= answered + 1
        assert deploy(changed, served) == 0.0
    finally:
        deploy(cfg, served)
    assert replicas(cfg, "EmbeddingModel") == before["EmbeddingModel"]


def test_a_version_that_cannot_load_fails_its_rollout_and_the_old_one_serves_on(
    server, registry, tmp_path
):
    import shutil

    tracker, follower = registry["tracker"], server["follower"]
    broken = shutil.copytree(registry["folders"][0], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\0" * 64)  # not a weights file
    version = _register(tracker, broken, "c" * 64)
    tracker.client.set_registered_model_alias(NAME, "champion", version)
    try:
        rollout = follower.poll()
        assert rollout is not None and rollout.version == version
        assert rollout.error and "failed" in rollout.error and rollout.deploy_s is None
        # The last good version was deployed again at once: Serve's target is whole.
        assert "rolled back to" in rollout.error
        assert follower.served.digest == registry["digests"][0]
        from rzenembed.serving.app import _is_running

        assert _is_running(registry["cfg"].serve.app_name)
        response = _post(server, {"input": "still the old model"})
        assert response.status_code == 200
        assert response.json()["rzenembed"]["digest"] == registry["digests"][0]
        assert follower.poll() is None  # the broken version is not retried while named
    finally:  # moving the alias back: nothing left to do
        tracker.client.set_registered_model_alias(NAME, "champion", registry["versions"][0])
    assert follower.poll() is None
    response = _post(server, {"input": "recovered"})
    assert response.json()["rzenembed"]["digest"] == registry["digests"][0]


def test_an_item_the_model_refuses_fails_only_its_own_request(server, reference):
    from rzenembed.serving.app import EmbeddingModel

    # 1 x 4000 pixels passes the endpoint's limits but not the processor (aspect ratio).
    strip = _png(Image.new("RGB", (4000, 1), "white"))
    response = _post(server, {"input": ["fine", {"image": strip}]})
    assert response.status_code == 400
    assert "aspect ratio" in response.json()["error"]["message"]
    # Batched with another client's items, only the refused call gets the error.
    replica = EmbeddingModel.__new__(EmbeddingModel)
    replica.embedder, replica.info_doc = reference, {"digest": "d"}
    forwards = []
    forward = replica._forward
    replica._forward = lambda items: forwards.append(len(items)) or forward(items)
    good = [EmbedInput(text="fine"), EmbedInput(text="also fine")]
    bad = [EmbedInput(images=[np.asarray(Image.new("RGB", (4000, 1)))])]
    answers = replica._embed_calls([good, bad, good[:1]])
    np.testing.assert_allclose(answers[0]["vectors"], reference.encode(good).numpy(), atol=1e-5)
    assert "aspect ratio" in answers[1]["error"] and answers[1]["kind"] == "input"
    np.testing.assert_allclose(answers[2]["vectors"], answers[0]["vectors"][:1], atol=1e-5)
    assert forwards == [4, 3]  # the batch, then the good calls together: no one-by-one rerun
    assert _post(server, {"input": "after"}).status_code == 200


def test_resolution_names_one_version_and_falls_back_to_the_uploaded_files(registry, tmp_path):
    import shutil

    from rzenembed.data.folders import cache_root
    from rzenembed.modeling.card import ModelCard
    from rzenembed.serving.source import (
        ModelSourceError,
        default_model_uri,
        local_model_folder,
        resolve_served_model,
    )

    cfg = registry["cfg"]
    assert default_model_uri(cfg) == f"models:/{NAME}@champion"
    served = resolve_served_model(f"models:/{NAME}/{registry['versions'][1]}", cfg)
    assert (served.version, served.digest) == (registry["versions"][1], registry["digests"][1])
    assert served.folder == str(registry["folders"][1])
    with pytest.raises(ModelSourceError, match="nightly"):
        resolve_served_model(f"models:/{NAME}@nightly", cfg)
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_served_model(str(tmp_path / "absent"), cfg)
    by_folder = resolve_served_model(str(registry["folders"][0]), cfg)
    assert by_folder.version is None and by_folder.digest == registry["digests"][0]

    # A version whose folder was cleaned up is served from its uploaded LoggedModel files.
    uploaded = cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"upload_models": True})}
    )
    folder = shutil.copytree(registry["folders"][1], tmp_path / "gone")
    tracker = Tracker(uploaded.tracking)
    run = tracker.start_step(None, "soup", "soup", {})
    model_id = tracker.log_model(run, "souped", folder, "souped-model", {}, {}, upload=True)
    tracker.register(model_id, run, registry["digests"][1], {})  # reuses v2: same digest
    shutil.rmtree(folder)
    version = tracker.client.get_model_version(NAME, registry["versions"][1])
    tracker.client.set_model_version_tag(NAME, version.version, "rzenembed.model_id", model_id)
    served = resolve_served_model(f"models:/{NAME}/{version.version}", uploaded)
    assert served.folder is None and served.model_id == model_id
    local = local_model_folder(served)
    assert local.startswith(str(cache_root())) and ModelCard.exists(local)
    assert model_digest(local) == registry["digests"][1]
    tracker.client.set_model_version_tag(
        NAME, version.version, "rzenembed.model_id", version.tags["rzenembed.model_id"]
    )


def test_back_pressure_answers_429_and_a_late_request_504(server, registry):
    """A second application whose replica waits 0.5 s to fill a batch, with a queue of one
    and a 0.2 s deadline: a request outlives the deadline (504), and while one is in
    flight the rest of a burst gets 429 with Retry-After at once (never a wait); both say
    what happened, and no internal text leaks."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from rzenembed.serving.app import deploy
    from rzenembed.serving.source import resolve_served_model

    cfg = registry["cfg"]
    settings = {
        "app_name": "busy",
        "route_prefix": "/busy",
        "max_queued_requests": 1,
        "api_replicas": 1,  # the queue limit is per HTTP replica
        "request_timeout_s": 0.2,
        "max_batch_size": 64,
        "batch_wait_timeout_s": 0.5,
        "auth": "none",
    }
    busy = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=settings)})
    deploy(busy, resolve_served_model(f"models:/{NAME}/{registry['versions'][0]}", busy))
    try:
        url = server["url"] + "/busy/v1/embeddings"
        body = {"input": [f"item {i} " * 20 for i in range(8)]}
        late = requests.post(url, json=body, timeout=60)
        assert late.status_code == 504, late.text
        error = late.json()["error"]
        assert error["type"] == "timeout" and "within 0.2 s (request id req-" in error["message"]
        assert late.headers["x-rzenembed-request-id"] in error["message"]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: requests.post(url, json=body, timeout=60), range(8)))
        statuses = sorted(a.status_code for a in answers)
        assert 429 in statuses and set(statuses) <= {429, 504}, statuses
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    finally:
        serve.delete("busy")


def replica_processes(cfg) -> dict[str, list]:
    """The processes of the served application's replicas on this machine, by deployment
    (Ray titles an actor's worker ``ray::ServeReplica:APP:DEPLOYMENT``)."""
    import psutil

    found: dict[str, list] = {"EmbeddingsAPI": [], "EmbeddingModel": []}
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        for deployment, processes in found.items():
            if f"ServeReplica:{cfg.serve.app_name}:{deployment}" in title:
                processes.append(process)
    return found


RSS_BOUND = 48 * 2**20  # what a replica may grow by (measured: 2-13 MiB; one full decode: 103)


def test_a_bounded_mixed_load_answers_every_valid_request_and_holds_memory(server, registry):
    """A fixed load on loopback (4 clients, 80 requests, then it stops): valid requests
    interleaved with a body over the size limit, an item with too many images, broken JSON
    and a 117 KB PNG that declares 36M pixels (108 MB if decoded). Every valid request is
    answered 200 and every other one refused 4xx, never a 5xx; no replica's resident memory
    grows by more than ``RSS_BOUND`` (one full decode of the large PNG alone would pass it).
    The queue limit's 429s: test_back_pressure_answers_429_and_a_late_request_504."""
    from concurrent.futures import ThreadPoolExecutor

    limits = registry["cfg"].serve.limits
    small = _png(random_image(3))
    white = _png(Image.new("RGB", (6000, 6000), "white"))
    bodies = {
        "valid": (200, {"input": ["load", {"text": "a picture", "image": small}]}),
        "oversized": (413, b'{"input": "' + b"a" * (limits.max_request_bytes + 2**19) + b'"}'),
        "many-images": (413, {"input": [{"images": [small] * (limits.max_images_per_item + 1)}]}),
        "bad-json": (400, b'{"input": ["unfinished'),
        "huge-pixels": (413, {"input": [{"image": white}]}),
    }
    plan = [kind for _ in range(16) for kind in bodies]  # interleaved, 80 requests
    url = server["url"] + "/v1/embeddings"
    headers = {**server["auth"], "content-type": "application/json"}

    def send(kind: str) -> tuple[str, int, int]:
        body = bodies[kind][1]
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = requests.post(url, data=data, headers=headers, timeout=60)
        items = len(response.json().get("data", [])) if response.ok else 0
        return kind, response.status_code, items

    assert send("valid")[1] == 200  # warm: the first image a replica decodes
    processes = replica_processes(registry["cfg"])
    assert len(processes["EmbeddingsAPI"]) == 2 and processes["EmbeddingModel"]
    tracked = [p for ps in processes.values() for p in ps]
    baseline = {p.pid: p.memory_info().rss for p in tracked}
    peak = dict(baseline)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            for p in tracked:
                peak[p.pid] = max(peak[p.pid], p.memory_info().rss)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(send, plan))
    finally:
        stop.set()
        watcher.join()
    wrong = [(k, code) for k, code, _ in answers if code != bodies[k][0]]
    assert not wrong, wrong
    assert all(items == 2 for k, _, items in answers if k == "valid")
    grown = {pid: peak[pid] - baseline[pid] for pid in baseline}
    shown = {pid: f"{g / 2**20:.0f} MiB" for pid, g in grown.items()}
    assert max(grown.values()) < RSS_BOUND, shown


def test_metrics_parse_and_move_with_the_requests_and_probes_answer(server, registry):
    """``/metrics`` is Prometheus text that ``prometheus_client``'s parser reads; its
    counters move with this test's requests; ``/health`` and ``/ready`` answer without a
    key, ``/metrics`` wants one."""

    def scrape() -> dict[tuple[str, tuple], float]:
        return _scrape(server)

    def ok_count(values) -> float:
        key = ("rzenembed_requests_total", (("code", "200"), ("route", "/v1/embeddings")))
        return values.get(key, 0.0)

    before = scrape()
    for i in range(3):
        assert _post(server, {"input": [f"metric {i}", "two"]}).status_code == 200
    assert _post(server, {"input": []}).status_code == 400
    after = scrape()
    assert ok_count(after) - ok_count(before) == 3
    bad = ("rzenembed_requests_total", (("code", "400"), ("route", "/v1/embeddings")))
    assert after[bad] - before.get(bad, 0.0) >= 1
    assert after[("rzenembed_items_total", ())] - before.get(("rzenembed_items_total", ()), 0) == 6
    assert after[("rzenembed_tokens_total", ())] > before.get(("rzenembed_tokens_total", ()), 0)
    assert after[("rzenembed_batch_items_count", ())] >= 3
    for stage in ("decode", "queue", "model"):  # one observation per embedded request
        key = ("rzenembed_stage_seconds_count", (("stage", stage),))
        assert after[key] - before.get(key, 0.0) == 3, stage
    model_s = ("rzenembed_stage_seconds_sum", (("stage", "model"),))
    assert after[model_s] > before.get(model_s, 0.0)
    assert after[("rzenembed_in_flight", ())] == 0
    served = [k for k, v in after.items() if k[0] == "rzenembed_model_info" and v == 1]
    assert len(served) == 1 and dict(served[0][1])["digest"] in registry["digests"]
    assert requests.get(server["url"] + "/metrics", timeout=30).status_code == 401
    health = requests.get(server["url"] + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["replica"]
    ready = requests.get(server["url"] + "/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["model"]["version"] in registry["versions"]

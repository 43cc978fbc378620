"""LoRA souping: exact arithmetic, merged models that load everywhere, greedy choice, checks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from rzenembed.config import LoraConfig, ModelConfig
from rzenembed.modeling import ModelCard, RzenEmbedder
from rzenembed.modeling.digest import folder_digest
from rzenembed.modeling.tiny import build_tiny_model
from rzenembed.soup import SoupError, load_adapter, resolve_weights, soup

TEXTS = ["a red circle at the top left", "a blue square", "three green stars"]


def model_config(path) -> ModelConfig:
    return ModelConfig(name_or_path=str(path), max_visual_tokens=16, max_text_tokens=64)


def make_adapter(base, out, seed, r=4, alpha=8.0, b_scale=0.05, **lora) -> dict:
    """Save an adapter whose B factors are non-zero; return its factors by module name."""
    embedder = RzenEmbedder.from_pretrained(base, config=model_config(base))
    torch.manual_seed(seed)
    embedder.apply_lora(LoraConfig(r=r, alpha=alpha, dropout=0.0, **lora))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, param in embedder.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * b_scale)
            if "lora_" in name:
                module = name.split(".lora_")[0].removeprefix("base_model.model.")
                factors.setdefault(module, {})[name.split(".lora_")[1][0]] = param.detach().clone()
    embedder.save_pretrained(out, extra={"stage": "stage2", "mixture": out.name})
    return {m: (f["A"], f["B"], alpha / r) for m, f in factors.items()}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: (root / name, make_adapter(tiny_model_dir, root / name, seed))
        for name, seed in (("even", 1), ("doc-heavy", 2), ("video-heavy", 3))
    }


def merged_minus_base(merged_dir, base_dir) -> dict[str, torch.Tensor]:
    """Weight differences by module name, both folders loaded with plain transformers."""
    merged = Qwen2VLForConditionalGeneration.from_pretrained(merged_dir).state_dict()
    base = Qwen2VLForConditionalGeneration.from_pretrained(base_dir).state_dict()
    return {k: merged[k] - base[k] for k in base}


def test_delta_soup_equals_the_weighted_sum_of_updates(adapters, tiny_model_dir, tmp_path):
    (p1, f1), (p2, f2) = adapters["even"], adapters["doc-heavy"]
    result = soup([p1, p2], tmp_path / "soup", weights=[1.0, 3.0])
    diff = merged_minus_base(tmp_path / "soup", tiny_model_dir)
    assert len(f1) > 20
    for module, (a1, b1, s1) in f1.items():
        a2, b2, s2 = f2[module]
        expected = 0.25 * s1 * (b1 @ a1) + 0.75 * s2 * (b2 @ a2)
        assert expected.abs().max() > 1e-4  # the updates are not trivial
        torch.testing.assert_close(diff[f"{module}.weight"], expected, atol=1e-6, rtol=0)
    untouched = [k for k in diff if k.removesuffix(".weight") not in f1]
    assert untouched and all(diff[k].abs().max() == 0 for k in untouched)
    assert [a["weight"] for a in result.recipe["adapters"]] == [0.25, 0.75]


def test_factors_soup_equals_its_own_hand_computation(adapters, tiny_model_dir, tmp_path):
    (p1, f1), (p2, f2) = adapters["even"], adapters["doc-heavy"]
    soup([p1, p2], tmp_path / "soup", method="factors", weights=[1.0, 1.0])
    diff = merged_minus_base(tmp_path / "soup", tiny_model_dir)
    for module, (a1, b1, scale) in f1.items():
        a2, b2, _ = f2[module]
        expected = scale * ((0.5 * b1 + 0.5 * b2) @ (0.5 * a1 + 0.5 * a2))
        torch.testing.assert_close(diff[f"{module}.weight"], expected, atol=1e-6, rtol=0)
        delta = 0.5 * scale * (b1 @ a1 + b2 @ a2)
        assert (expected - delta).abs().max() > 1e-4  # not the same thing as delta


def test_a_merged_single_adapter_embeds_like_base_plus_adapter(adapters, tmp_path):
    path, _ = adapters["even"]
    soup([path], tmp_path / "merged")
    with_adapter = RzenEmbedder.from_pretrained(path).encode(TEXTS)
    merged = RzenEmbedder.from_pretrained(tmp_path / "merged").encode(TEXTS)
    assert (with_adapter - merged).abs().max() < 1e-4
    assert not torch.allclose(with_adapter[0], with_adapter[1], atol=1e-3)


def test_the_souped_folder_loads_with_plain_transformers(adapters, tmp_path):
    paths = [adapters["even"][0], adapters["doc-heavy"][0]]
    soup(paths, tmp_path / "soup")
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "soup")
    souped = RzenEmbedder.from_pretrained(tmp_path / "soup").hf_model.state_dict()
    assert model.state_dict().keys() == souped.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, souped[name], atol=0, rtol=0)


def test_the_card_records_the_recipe_and_every_input_digest(adapters, tmp_path):
    paths = [adapters["even"][0], adapters["doc-heavy"][0]]
    soup(paths, tmp_path / "soup")
    card = ModelCard.load(tmp_path / "soup")
    assert card.kind == "model" and card.template == "rzenembed-paper"
    recipe = card.extra["soup"]
    assert recipe["method"] == "delta"
    assert [a["digest"] for a in recipe["adapters"]] == [folder_digest(p) for p in paths]
    assert [a["mixture"] for a in recipe["adapters"]] == ["even", "doc-heavy"]
    assert recipe["base_digest"] == load_adapter(paths[0]).base_digest


def test_greedy_keeps_an_adapter_that_helps_and_drops_one_that_hurts(adapters, tmp_path):
    """The held-out score is closeness to the midpoint of two adapters: each alone scores
    the same, together they are perfect, and the third only moves the soup away."""
    (p1, f1), (p2, f2), (p3, _) = (adapters[n] for n in ("even", "doc-heavy", "video-heavy"))
    module = next(iter(f1))
    a1, b1, s = f1[module]
    a2, b2, _ = f2[module]
    target_update = 0.5 * s * (b1 @ a1 + b2 @ a2)
    base = None

    def score(embedder: RzenEmbedder) -> float:
        nonlocal base
        weight = embedder.hf_model.get_submodule(module).weight.detach()
        if base is None:  # the first call scores the first adapter alone
            base = weight - s * (b1 @ a1)
        return -float((weight - base - target_update).norm())

    result = soup([p1, p3, p2], tmp_path / "greedy", method="greedy", score=score)
    greedy = result.recipe["greedy"]
    assert (
        min(greedy["alone"]["even"], greedy["alone"]["doc-heavy"]) > greedy["alone"]["video-heavy"]
    )  # so the helpful one is tried before the harmful one
    assert sorted(greedy["kept"]) == ["doc-heavy", "even"]
    kept_second, dropped = greedy["steps"]
    assert kept_second["kept"] and kept_second["score"] > -1e-5  # the midpoint: perfect
    assert dropped == {**dropped, "adapter": "video-heavy", "kept": False}
    assert dropped["score"] < dropped["best"]
    assert [a["weight"] for a in result.recipe["adapters"]] == [0.5, 0.0, 0.5]


def test_adapters_of_another_base_fail_before_writing(adapters, tmp_path):
    other_base = build_tiny_model(tmp_path / "other-base", seed=7)
    stranger = tmp_path / "stranger"
    make_adapter(other_base, stranger, seed=1)
    out = tmp_path / "out" / "soup"
    with pytest.raises(SoupError, match=r"different base models") as error:
        soup([adapters["even"][0], stranger], out)
    assert str(stranger) in str(error.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_adapters_with_other_targets_fail_naming_the_module(adapters, tiny_model_dir, tmp_path):
    llm_only = tmp_path / "llm-only"
    make_adapter(tiny_model_dir, llm_only, seed=4, vision=False)
    out = tmp_path / "soup"
    with pytest.raises(SoupError, match=r"llm-only does not target model\.visual\.") as error:
        soup([adapters["even"][0], llm_only], out)
    assert "and " in str(error.value) and not out.exists()


def test_factors_need_equal_ranks_delta_does_not(adapters, tiny_model_dir, tmp_path):
    rank2 = tmp_path / "rank2"
    f2 = make_adapter(tiny_model_dir, rank2, seed=5, r=2, alpha=4.0)
    with pytest.raises(SoupError, match=r"rank 2 differs from rank 4 .*\(use 'delta'\)"):
        soup([adapters["even"][0], rank2], tmp_path / "factors", method="factors")
    soup([adapters["even"][0], rank2], tmp_path / "delta")
    diff = merged_minus_base(tmp_path / "delta", tiny_model_dir)
    module, (a1, b1, s1) = next(iter(adapters["even"][1].items()))
    a2, b2, s2 = f2[module]
    expected = 0.5 * s1 * (b1 @ a1) + 0.5 * s2 * (b2 @ a2)
    torch.testing.assert_close(diff[f"{module}.weight"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, math.nan], "finite"),
        ([1.0, -1.0], "positive"),
        ([0.0, 0.0], "positive"),
        ([1.0], "1 soup weights for 2 adapters"),
    ],
)
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(SoupError, match=message):
        resolve_weights(weights, 2)


def test_weights_are_normalised_unless_asked_not_to():
    assert resolve_weights([1, 3], 2) == [0.25, 0.75]
    assert resolve_weights([1, 3], 2, normalize=False) == [1.0, 3.0]
    assert resolve_weights(None, 4) == [0.25] * 4


def test_an_existing_output_is_never_overwritten(adapters, tmp_path):
    (tmp_path / "soup").mkdir()
    with pytest.raises(FileExistsError):
        soup([adapters["even"][0]], tmp_path / "soup")


def test_greedy_needs_a_score(adapters, tmp_path):
    with pytest.raises(SoupError, match="score function"):
        soup([adapters["even"][0]], tmp_path / "soup", method="greedy")


def test_the_soup_streams_one_module_update_at_a_time_with_the_same_bits():
    """Applying the streamed updates gives bit for bit the weights of the whole-dict path
    (and the plain ``sum w_i s_i B_i A_i``), and never holds more than two dense updates."""
    import weakref

    from rzenembed.soup import apply_updates, iter_soup_updates, random_adapters, soup_updates

    adapters = random_adapters([str(m) for m in range(6)], (32, 64), 3, rank=8)
    weights = [0.2, 0.3, 0.5]
    whole = soup_updates(adapters, weights, "delta")
    for module, update in whole.items():
        plain = sum(w * a.update(module) for w, a in zip(weights, adapters, strict=True))
        assert torch.equal(update, plain)
    alive, peak = [0], [0]

    def counted():
        for module, update in iter_soup_updates(adapters, weights, "delta"):
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(update, lambda: alive.__setitem__(0, alive[0] - 1))
            yield module, update

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(*[torch.nn.Linear(64, 32, bias=False) for _ in range(6)])

    streamed, reference = model(), model()
    apply_updates(streamed, counted())
    apply_updates(reference, whole)
    assert peak[0] <= 2
    for a, b in zip(streamed.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)

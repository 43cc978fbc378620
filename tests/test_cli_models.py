"""The model-facing commands: embed (resumable), evaluate, import-mmeb-eval, soup."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from rzenembed import embedding
from rzenembed.cli import main
from rzenembed.config import LoraConfig, ModelConfig
from rzenembed.embedding import EmbedJobError, embed_file, read_embeddings
from rzenembed.modeling import EmbedInput, RzenEmbedder
from rzenembed.modeling.inputs import sample_frames


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """A model folder with its rzenembed.json, as training and souping write them."""
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), max_visual_tokens=16, video_frames=4)
    out = tmp_path_factory.mktemp("cli-model") / "model"
    RzenEmbedder.from_pretrained(tiny_model_dir, config=cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def inputs(sample_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "media").mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (56, 56), colour).save(folder / "media" / f"f{i}.png")
    video = next((sample_corpus.root / "eval" / "eval-video-retrieval").rglob("*.mp4"))
    shutil.copy(video, folder / "media" / "clip.mp4")
    rows = [
        {"id": "t", "text": "a red circle", "instruction": "Find an image."},
        {"id": "i", "image": "media/f0.png", "instruction": "Represent the image."},
        {"id": "v", "video": "media/clip.mp4", "text": "a clip"},
        {"id": "fr", "frames": ["media/f0.png", "media/f1.png", "media/f2.png"]},
        {"text": "no id: the line number is the id"},
    ]
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def expected_vectors(model_dir, folder) -> torch.Tensor:
    embedder = RzenEmbedder.from_pretrained(model_dir)
    image = lambda name: Image.open(folder / "media" / name).convert("RGB")  # noqa: E731
    from rzenembed.training.collate import MediaReader

    clip = MediaReader(str(folder)).frames({"uri": "media/clip.mp4"}, 4)
    items = [
        EmbedInput(text="a red circle", instruction="Find an image."),
        EmbedInput(images=[image("f0.png")], instruction="Represent the image."),
        EmbedInput(text="a clip", video=clip),
        EmbedInput(video=sample_frames([image(f"f{i}.png") for i in range(3)], 4)),
        EmbedInput(text="no id: the line number is the id"),
    ]
    return embedder.encode(items)


def test_embed_writes_ids_and_vectors_in_input_order(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "emb.parquet"
    assert main(["embed", "--model", str(model_dir), str(inputs / "in.jsonl"), str(out),
                 "--part-rows", "2"]) == 0  # fmt: skip
    ids, vectors = read_embeddings(out)
    assert ids == ["t", "i", "v", "fr", "5"]
    assert vectors.shape == (5, 64) and vectors.dtype.name == "float32"
    torch.testing.assert_close(torch.from_numpy(vectors), expected_vectors(model_dir, inputs),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert not (tmp_path / "emb.parquet.parts").exists()
    assert "embeddings written to" in capsys.readouterr().out


def test_an_interrupted_embed_resumes_from_its_parts(model_dir, inputs, tmp_path, monkeypatch):
    out = tmp_path / "emb.parquet"
    real = embedding.to_embed_input
    calls: list[str] = []

    def failing(row, reader, max_frames):
        if len(calls) == 4:
            raise KeyboardInterrupt  # stopped during the third part
        calls.append(row.id)
        return real(row, reader, max_frames)

    monkeypatch.setattr(embedding, "to_embed_input", failing)
    with pytest.raises(KeyboardInterrupt):
        embed_file(model_dir, inputs / "in.jsonl", out, part_rows=2, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "emb.parquet.parts").glob("part-*")) == [
        "part-000000.parquet", "part-000001.parquet",
    ]  # fmt: skip
    calls.clear()
    monkeypatch.setattr(embedding, "to_embed_input", lambda *a: calls.append(a[0].id) or real(*a))
    embed_file(model_dir, inputs / "in.jsonl", out, part_rows=2, show_progress=False)
    assert calls == ["5"]  # only the last part was embedded again
    ids, vectors = read_embeddings(out)
    assert ids == ["t", "i", "v", "fr", "5"]
    torch.testing.assert_close(torch.from_numpy(vectors), expected_vectors(model_dir, inputs),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_parts_of_another_job_are_not_mixed_in(model_dir, inputs, tmp_path):
    out = tmp_path / "emb.parquet"
    parts = tmp_path / "emb.parquet.parts"
    parts.mkdir()
    (parts / "job.json").write_text(json.dumps({"input_digest": "other"}))
    with pytest.raises(EmbedJobError, match="parts of another job"):
        embed_file(model_dir, inputs / "in.jsonl", out, show_progress=False)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "media/nope.png"}, "line 2: image file not found"),
        ({"image": "media/notes.txt"}, "line 2: 'media/notes.txt' is not a supported image"),
        ({"video": "media/f0.png"}, "line 2: 'media/f0.png' is not a supported video"),
        ({"text": "x", "colour": "red"}, r"line 2: unknown fields \['colour'\]"),
        ({"instruction": ""}, "line 2: nothing to embed"),
    ],
)
def test_bad_lines_fail_before_any_work_with_their_line_number(
    model_dir, inputs, tmp_path, capsys, row, message
):
    (inputs / "media" / "notes.txt").write_text("not an image")
    bad = inputs / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    assert main(["embed", "--model", str(model_dir), str(bad), str(tmp_path / "o.parquet")]) == 2
    assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    assert not (tmp_path / "o.parquet.parts").exists()


def test_a_model_folder_without_its_card_is_refused(tiny_model_dir, inputs, tmp_path, capsys):
    code = main(["embed", "--model", str(tiny_model_dir), str(inputs / "in.jsonl"),
                 str(tmp_path / "o.parquet")])  # fmt: skip
    assert code == 2
    assert "has no rzenembed.json" in capsys.readouterr().err
    code = main(["embed", "--model", str(tmp_path / "missing"), str(inputs / "in.jsonl"),
                 str(tmp_path / "o.parquet")])  # fmt: skip
    assert code == 2 and "model folder not found" in capsys.readouterr().err


def test_evaluate_writes_the_report(model_dir, sample_corpus, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["evaluate", "--model", str(model_dir), "--eval", str(sample_corpus.root / "eval"),
                 str(out), "--cache", str(tmp_path / "cache"), "--batch-size", "8"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["all"]["datasets"] == 4 and len(report["model"]["digest"]) == 64
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4
    assert capsys.readouterr().out.startswith("All: ")
    # The model has no calibration and no trained sizes: float and binary at the full size.
    assert sorted(report["compact"]["variants"]) == ["64/binary", "64/float"]
    assert report["compact"]["variants"]["64/float"]["scores"]["All"] == report["all"]["score"]
    smaller = tmp_path / "smaller"
    eval_sets = str(sample_corpus.root / "eval")
    args = ["--dimensions", "8,16", "--precision", "float", "--precision", "ubinary"]
    args += ["--cache", str(tmp_path / "cache")]
    code = main(["evaluate", "--model", str(model_dir), "--eval", eval_sets, str(smaller), *args])
    assert code == 0
    compact = json.loads((smaller / "report.json").read_text())["compact"]
    assert compact["dimensions"] == [8, 16, 64] and compact["precisions"] == ["float", "ubinary"]
    assert compact["variants"]["8/ubinary"]["bytes"] == 1
    assert "## Nested dimensions and precisions" in (smaller / "report.md").read_text()


def test_import_mmeb_eval_command(tmp_path, capsys):
    rows = [{"qry": "a question", "qry_image_path": "", "tgt_text": ["yes", "no"],
             "tgt_img_path": ["", ""]}]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n")
    code = main(
        [
            "import-mmeb-eval",
            str(tmp_path / "rows.jsonl"),
            str(tmp_path / "set"),
            "--name",
            "yn",
            "--category",
            "image_qa",
            "--media-root",
            str(tmp_path),
        ]
    )
    assert code == 0 and (tmp_path / "set" / "queries.jsonl").is_file()
    code = main(
        [
            "import-mmeb-eval",
            str(tmp_path / "rows.jsonl"),
            str(tmp_path / "set2"),
            "--name",
            "yn",
            "--category",
            "poetry",
            "--media-root",
            str(tmp_path),
        ]
    )
    assert code == 2 and "unknown evaluation category 'poetry'" in capsys.readouterr().err


def test_soup_command(tiny_model_dir, tmp_path, capsys):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), max_visual_tokens=16)
    adapters = []
    for seed in (1, 2):
        embedder = RzenEmbedder.from_pretrained(tiny_model_dir, config=cfg)
        torch.manual_seed(seed)
        embedder.apply_lora(LoraConfig(r=2, alpha=4, dropout=0.0))
        adapters.append(str(embedder.save_pretrained(tmp_path / f"a{seed}")))
    code = main(["soup", *adapters, "--out", str(tmp_path / "souped"), "--weights", "1,3"])
    assert code == 0 and "souped model (delta" in capsys.readouterr().out
    recipe = json.loads((tmp_path / "souped" / "rzenembed.json").read_text())["extra"]["soup"]
    assert [a["weight"] for a in recipe["adapters"]] == [0.25, 0.75]
    code = main(["soup", *adapters, "--out", str(tmp_path / "s2"), "--weights", "1,-1"])
    assert code == 2 and "sum to a positive number" in capsys.readouterr().err

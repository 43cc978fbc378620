"""Import the MMEB-V2 release, as it lies on disk after download, into evaluation sets.

The release root holds the media the benchmark ships (``image-tasks/``,
``video-tasks/frames/...``, ``visdoc-tasks/<dataset>/``) and, under ``annotations/``, each
annotation repository downloaded as it is published (``annotations/<owner>/<name>/`` with
its Parquet or JSONL files: ``<config>/<split>-*.parquet``, ``data/<split>-*.parquet``,
``<split>.jsonl``, ...). ``mmeb_v2.csv`` says where each dataset's files are and how to
parse them (``rzenembed.evaluation.benchmark``).

Every dataset becomes one evaluation set folder (``OUT/<dataset>/``) with its queries, its
candidates (deduplicated by the name the benchmark gives them, so a shared label list is
embedded once), the benchmark's instructions, graded relevance for visual documents, and
an ``evalset.json`` recording the release tag, a digest of the annotations read, the
frames per video and the candidate rule. A dataset with a missing part (annotations,
media, label list, corpus pages, candidates) is not written: ``OUT/suite.json`` lists it
under ``skipped`` with the reason and counts (``kind``: ``incomplete``, or ``absent`` when
the release folder does not hold the dataset at all), and reports carry that list, so no
score is ever computed on a silently smaller set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rzenembed.data.formats.mmeb import MMEB_IMAGE_PLACEHOLDER
from rzenembed.data.schema import media, side
from rzenembed.data.storage import FRAME_SUFFIXES
from rzenembed.evaluation.benchmark import BenchmarkDataset, mmeb_v2
from rzenembed.evaluation.evalset import read_mmeb_rows, write_eval_folder
from rzenembed.modeling.digest import file_digest

SUITE = "suite.json"
ANNOTATIONS = "annotations"
DEFAULT_FRAMES = 8  # the benchmark's frames per video and per clip
EXAMPLES = 3  # example paths or ids kept per problem


class ReleaseError(ValueError):
    """A release folder this importer cannot read at all."""


@dataclass
class Problems:
    """What is missing in one dataset: counts and a few examples per kind."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, example: str, count: int = 1) -> None:
        self.counts[kind] += count
        kept = self.examples.setdefault(kind, [])
        if len(kept) < EXAMPLES:
            kept.append(example)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def describe(self) -> str:
        return "; ".join(
            f"{kind}: {n} (e.g. {', '.join(self.examples[kind])})"
            for kind, n in sorted(self.counts.items())
        )


class DatasetBuilder:
    """Queries and name-deduplicated candidates of one dataset, with media checks."""

    def __init__(self, item: BenchmarkDataset, release_root: Path):
        self.item = item
        self.release_root = release_root
        self.media_root = release_root / item.media
        self.queries: list[dict[str, Any]] = []
        self.candidates: list[dict[str, Any]] = []
        self.cids: dict[str, str] = {}
        self.problems = Problems()
        self.notes: Counter = Counter()
        self._checked: dict[str, bool] = {}

    # media ------------------------------------------------------------------------------
    def move_media_root(self, root: Path) -> None:
        """Read media from ``root`` from now on (pages written out of a corpus Parquet)."""
        self.media_root = root
        self._checked.clear()

    def image(self, uri: str) -> dict[str, Any]:
        if self._missing(uri, lambda p: p.is_file()):
            self.problems.add("missing_image", self._looked_for(uri))
        return media("image", uri)

    def frames(self, folder: str) -> dict[str, Any]:
        def has_frames(path: Path) -> bool:
            return path.is_dir() and any(f.suffix.lower() in FRAME_SUFFIXES for f in path.iterdir())

        if self._missing(folder, has_frames):
            self.problems.add("missing_frames", self._looked_for(folder) + "/")
        return media("frames", folder)

    def media_of(self, row: dict[str, Any], rule: int = 0) -> str | None:
        """Where the reference loader finds ``row``'s media (under the media folder); None,
        with the problem recorded, when the row lacks a field the path is built from."""
        try:
            return self.item.media_of(row, rule)
        except KeyError as error:
            self.problems.add("row_lacks_field", f"{error.args[0]!r} in row {len(self.queries)}")
            return None

    def _looked_for(self, uri: str) -> str:
        """The path that was looked for, as a person finds it in the release folder."""
        path = self.media_root / uri
        return (
            str(path.relative_to(self.release_root))
            if path.is_relative_to(self.release_root)
            else str(path)
        )

    def _missing(self, uri: str, present: Callable[[Path], bool]) -> bool:
        if uri not in self._checked:
            self._checked[uri] = present(self.media_root / uri)
        return not self._checked[uri]

    # candidates and queries -------------------------------------------------------------
    def candidate(self, name: str, value: dict[str, Any]) -> str:
        """The id of the candidate the benchmark names ``name`` (the first side given
        under a name is kept, as the benchmark's deduplication by name does)."""
        if name not in self.cids:
            self.cids[name] = f"{self.item.dataset}-c{len(self.cids):06d}"
            self.candidates.append(
                {"cid": self.cids[name], "dataset": self.item.dataset, "candidate": value}
            )
        return self.cids[name]

    def query(
        self,
        value: dict[str, Any],
        listed: list[str],
        relevant: list[str],
        relevance: list[float] | None = None,
    ) -> None:
        """A query; ``listed`` are candidate ids of a local query ([] for global)."""
        if not relevant:
            self.problems.add("no_relevant_candidate", f"row {len(self.queries)}")
            return
        if self.item.candidates == "local" and not listed:
            self.problems.add("empty_candidate_list", f"row {len(self.queries)}")
            return
        row = {
            "qid": f"{self.item.dataset}-q{len(self.queries):06d}",
            "dataset": self.item.dataset,
            "category": self.item.category,
            "query": value,
            "candidate_ids": list(dict.fromkeys(listed)),
            "relevant_ids": relevant,
        }
        if relevance is not None:
            row["relevance"] = relevance
        self.queries.append(row)


# --------------------------------------------------------------------------- annotations


def annotation_dir(root: Path, item: BenchmarkDataset) -> Path:
    return root / ANNOTATIONS / item.annotations


def annotation_files(folder: Path, config: str, split: str) -> list[Path]:
    """The files of one config and split of a downloaded annotation repository."""
    patterns = []
    if config:
        patterns += [
            f"{config}/{split}-*.parquet",
            f"{config}/{split}.parquet",
            f"{config}/{split}.jsonl",
            f"data/{config}/{split}-*.parquet",
        ]
    patterns += [
        f"data/{split}-*.parquet",
        f"{split}-*.parquet",
        f"{split}.parquet",
        f"{split}.jsonl",
        f"data/{split}.jsonl",
    ]
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found
    return []


def read_annotation_rows(files: Iterable[Path]) -> list[dict[str, Any]]:
    return [row for path in files for row in read_mmeb_rows(path)]


class Annotations:
    """Reads a dataset's annotation files and remembers every file it read (the digest)."""

    def __init__(self, root: Path, item: BenchmarkDataset):
        self.folder = annotation_dir(root, item)
        self.item = item
        self.read: list[Path] = []

    def rows(self, config: str | None = None) -> list[dict[str, Any]]:
        config = self.item.config if config is None else config
        files = annotation_files(self.folder, config, self.item.split)
        if not files:
            where = f"{self.folder}/{config + '/' if config else ''}{self.item.split}*"
            raise FileNotFoundError(f"annotations not found: {where} (.parquet or .jsonl)")
        self.read.extend(files)
        return read_annotation_rows(files)

    def subsets(self) -> dict[str, list[dict[str, Any]]]:
        """Every config folder's rows (MVBench publishes one config per task)."""
        out = {}
        folders = (
            sorted(p for p in self.folder.iterdir() if p.is_dir()) if self.folder.is_dir() else []
        )
        for folder in folders:
            files = annotation_files(folder, "", self.item.split)
            if files:
                self.read.extend(files)
                out[folder.name] = read_annotation_rows(files)
        if not out:
            where = f"{self.folder}/<task>/{self.item.split}*"
            raise FileNotFoundError(f"annotations not found: {where}")
        return out

    def extra_file(self, name: str) -> Path | None:
        path = self.folder / name
        if path.is_file():
            self.read.append(path)
            return path
        return None

    def digest(self, release: str) -> str:
        h = hashlib.sha256(f"release:{release}\n".encode())
        for path in sorted(set(self.read)):
            h.update(f"{path.relative_to(self.folder)}:{file_digest(path)}\n".encode())
        return h.hexdigest()


# --------------------------------------------------------------------------- parsers


def _listed(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _first(value: Any) -> str:
    values = _listed(value)
    return str(values[0]) if values else ""


def _no_tag(text: Any) -> str:
    return " ".join(str(text or "").replace(MMEB_IMAGE_PLACEHOLDER, " ").split())


def _strip_letter(option: str) -> str:
    """``"B. a dog"`` -> ``"a dog"``, as the benchmark cuts option letters (an option
    without ``". "`` is kept whole instead of being cut to its last character)."""
    option = str(option)
    cut = option.find(". ")
    return (option[cut:] if cut >= 0 else option).strip(". ")


def _options_text(options: list[str]) -> str:
    return "\nOptions:\n" + "\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(options))


def parse_image(b: DatasetBuilder, notes: Annotations) -> None:
    parser = b.item.parser
    for row in notes.rows():
        texts = _listed(row.get("tgt_text"))
        paths = _listed(row.get("tgt_img_path"))
        query_image = parser != "image_t2i" and row.get("qry_img_path")
        query = side(
            text=str(row.get("qry_text") or "").strip(),
            instruction=_no_tag(row.get("qry_inst")),
            media_items=[b.image(row["qry_img_path"])] if query_image else [],
        )
        listed = []
        if parser in ("image_cls", "image_qa", "image_i2t"):
            for text in texts:
                listed.append(b.candidate(str(text), side(text=str(text))))
        else:
            captions = texts if len(texts) == len(paths) else [""] * len(paths)
            for path, caption in zip(paths, captions, strict=True):
                caption = str(caption or "").strip()
                name = str(path) if parser == "image_t2i" else f"{path}:{caption.strip(chr(34))}"
                value = side(
                    text=caption,
                    instruction=_no_tag(row.get("tgt_inst")),
                    media_items=[b.image(str(path))],
                )
                listed.append(b.candidate(name, value))
        b.query(query, listed, listed[:1])


def parse_video_cls(b: DatasetBuilder, notes: Annotations) -> None:
    rows = notes.rows()
    labels_file = notes.extra_file("labels.txt")
    if labels_file is not None:
        labels = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    else:
        labels = list(dict.fromkeys(str(r[b.item.text_field]) for r in rows))
    if b.item.labels and len(labels) != b.item.labels:
        b.problems.add(
            "label_list",
            f"{len(labels)} labels, the benchmark ranks {b.item.labels} "
            f"(place the full list in {notes.folder}/labels.txt)",
        )
    for label in labels:
        b.candidate(label, side(text=label))
    for row in rows:
        label = str(row[b.item.text_field])
        if label not in b.cids:
            b.problems.add("label_not_in_list", label)
            continue
        folder = b.media_of(row)
        if folder is None:
            continue
        value = side(instruction=b.item.query_instruction, media_items=[b.frames(folder)])
        b.query(value, [], [b.cids[label]])


def parse_video_ssv2(b: DatasetBuilder, notes: Annotations) -> None:
    rows = notes.rows()
    for row in rows[: b.item.limit] if b.item.limit else rows:
        positive = str(row["pos_text"])
        names = list(dict.fromkeys([positive, *map(str, _listed(row.get("neg_text")))]))
        folder = b.media_of(row)
        if folder is None:
            continue
        listed = [b.candidate(n, side(text=n)) for n in names]
        value = side(instruction=b.item.query_instruction, media_items=[b.frames(folder)])
        b.query(value, listed, [b.cids[positive]])


def _qa_query(b: DatasetBuilder, body: str, folder: str) -> dict[str, Any]:
    return side(text=body, instruction=b.item.query_instruction, media_items=[b.frames(folder)])


def parse_video_qa(b: DatasetBuilder, notes: Annotations) -> None:
    """The five video QA sets: the option list and the answer each publishes its own way."""
    parser = b.item.parser
    if parser == "video_mvbench":
        subsets = notes.subsets().items()
        rows = [{**r, "subset": r.get("subset", s)} for s, rs in subsets for r in rs]
    else:
        rows = notes.rows()
    for row in rows:
        question = str(row.get("question") or "")
        folder = b.media_of(row)
        if folder is None:
            continue
        if parser == "video_mvbench":
            options = [str(o) for o in _listed(row.get("candidates"))]
            names = [f"({chr(65 + i)}) {o}" for i, o in enumerate(options)]
            answer = options.index(str(row["answer"])) if str(row["answer"]) in options else -1
            body = (question + _options_text(options)).rstrip()
        elif parser == "video_videomme":
            raw = [str(o) for o in _listed(row.get("options"))]
            names = [_strip_letter(o) for o in raw]
            answer = ord(str(row["answer"]).strip()[:1].upper() or "?") - 65
            body = question + "\n" + "\n".join(raw)
        elif parser == "video_nextqa":
            names = [str(row[f"a{i}"]) for i in range(5) if row.get(f"a{i}") is not None]
            answer = int(row["answer"])
            body = question + _options_text(names)
        elif parser == "video_egoschema":
            raw = [str(o) for o in _listed(row.get("option"))]
            names = [_strip_letter(o) for o in raw]
            answer = int(row["answer"])
            body = question + " ".join(raw)
        else:  # video_activitynetqa
            names = ["yes", "no"]
            said = str(row["answer"]).strip().lower()
            answer = names.index(said) if said in names else -1
            body = question + "? (A) yes; (B) no."
        listed = [b.candidate(n, side(text=n)) for n in names]
        if not 0 <= answer < len(listed):
            b.problems.add("answer_not_in_options", f"{question[:40]!r}")
            continue
        b.query(_qa_query(b, body, folder), listed, [listed[answer]])


def parse_video_ret(b: DatasetBuilder, notes: Annotations) -> None:
    for row in notes.rows():
        video = b.media_of(row)  # the frame folder, which also names the candidate
        if video is None:
            continue
        target = side(instruction=b.item.target_instruction, media_items=[b.frames(video)])
        cid = b.candidate(video, target)
        caption = _first(row[b.item.text_field]).strip()
        b.query(side(text=caption, instruction=b.item.query_instruction), [], [cid])


def parse_video_mret(b: DatasetBuilder, notes: Annotations) -> None:
    """QVHighlight, Charades-STA: a video's folder holds ``query/`` (the whole video's
    frames) and one folder per clip; clips named ``positive*`` are relevant."""
    for row in notes.rows():
        video = b.media_of(row)
        if video is None:
            continue
        folder = b.media_root / video
        clips = (
            sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "query")
            if folder.is_dir()
            else []
        )
        if not clips:
            b.problems.add("missing_clips", video)
            continue
        target = b.item.target_instruction
        listed = [
            b.candidate(
                f"{video}/{c}", side(instruction=target, media_items=[b.frames(f"{video}/{c}")])
            )
            for c in clips
        ]
        relevant = [cid for cid, c in zip(listed, clips, strict=True) if c.startswith("positive")]
        value = side(
            text=str(row[b.item.text_field]).strip(),
            instruction=b.item.query_instruction,
            media_items=[b.frames(f"{video}/query")],
        )
        b.query(value, listed, relevant)


def _clip_path(entry: Any) -> str:
    return str(entry["output_path"] if isinstance(entry, dict) else entry)


def parse_video_momentseeker(b: DatasetBuilder, notes: Annotations) -> None:
    """Clips and video queries lie under ``video_frames/`` (their paths flattened); an image
    query (``input_frames`` ending in ``.jpg``, exactly as the reference tests it) is the
    file ``query_<input_frames>`` beside it, its folders kept; any other input is text only."""
    with_video, with_image, text_only = b.item.query_instructions

    def clip(path: str) -> str:
        return b.item.media_of({"output_path": path})

    for row in notes.rows():
        positives = [clip(_clip_path(p)) for p in _listed(row.get("positive_frames"))]
        negatives = [clip(_clip_path(p)) for p in _listed(row.get("negative_frames"))]
        listed = [
            b.candidate(c, side(instruction=b.item.target_instruction, media_items=[b.frames(c)]))
            for c in positives + negatives
        ]
        given = str(row.get("input_frames") or "")
        text = str(row[b.item.text_field]).strip()
        if given.endswith(".mp4"):
            frames = b.frames(clip(given))
            value = side(text=text, instruction=with_video, media_items=[frames])
        elif given.endswith(".jpg"):
            image = b.image(b.item.media_of({"input_frames": given}, rule=1))
            value = side(text=text, instruction=with_image, media_items=[image])
        else:
            value = side(text=text, instruction=text_only)
        b.query(value, listed, listed[: len(positives)])


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, bytes | bytearray) and value else None


def parse_visdoc(b: DatasetBuilder, notes: Annotations, pages_out: Path) -> None:
    """BEIR ``queries``/``corpus``/``qrels``: qrels with score > 0 (the highest per pair)
    are graded gains; the pool is the whole corpus. Pages are read from the release's
    page folder, or written from the corpus's own image bytes when that folder lacks them."""
    item = b.item
    queries = notes.rows("queries")
    if item.language:
        queries = [q for q in queries if q.get("language") == item.language]
    corpus = notes.rows("corpus")
    grades: dict[str, dict[str, float]] = {}
    for qrel in notes.rows("qrels"):
        score = float(qrel.get("score", 1))
        if score > 0:
            row = grades.setdefault(str(qrel["query-id"]), {})
            doc = str(qrel["corpus-id"])
            row[doc] = max(score, row.get(doc, 0.0))
    names = {str(c["corpus-id"]): item.media_of({"corpus-id": str(c["corpus-id"])}) for c in corpus}
    on_disk = all((b.media_root / n).is_file() for n in names.values())
    if not on_disk:
        pages_out.mkdir(parents=True, exist_ok=True)
        for row in corpus:
            data = _image_bytes(row.get("image"))
            if data is not None:
                (pages_out / names[str(row["corpus-id"])]).write_bytes(data)
        b.move_media_root(pages_out)
    for corpus_id, name in names.items():
        b.candidate(
            corpus_id, side(instruction=item.target_instruction, media_items=[b.image(name)])
        )
    for query in queries:
        judged = grades.get(str(query["query-id"]), {})
        unknown = [doc for doc in judged if doc not in b.cids]
        for doc in unknown:
            b.problems.add("qrel_to_absent_corpus_id", f"{query['query-id']}->{doc}")
        if not judged:
            b.notes["queries_without_positive_qrels"] += 1
            continue
        if unknown:
            continue
        value = side(text=str(query["query"]).strip(), instruction=item.query_instruction)
        b.query(value, [], [b.cids[d] for d in judged], list(judged.values()))


PARSE: dict[str, Callable[..., None]] = {
    "image_cls": parse_image,
    "image_qa": parse_image,
    "image_i2t": parse_image,
    "image_t2i": parse_image,
    "image_i2i_vg": parse_image,
    "video_cls": parse_video_cls,
    "video_ssv2": parse_video_ssv2,
    "video_mvbench": parse_video_qa,
    "video_videomme": parse_video_qa,
    "video_nextqa": parse_video_qa,
    "video_egoschema": parse_video_qa,
    "video_activitynetqa": parse_video_qa,
    "video_ret": parse_video_ret,
    "video_mret": parse_video_mret,
    "video_momentseeker": parse_video_momentseeker,
}


# --------------------------------------------------------------------------- import


@dataclass
class ImportResult:
    out: Path
    written: dict[str, dict[str, Any]]
    skipped: dict[str, dict[str, Any]]


def import_mmeb_v2(
    root: str | Path,
    out: str | Path,
    release: str = "unnamed",
    frames: int = DEFAULT_FRAMES,
    datasets: Iterable[str] = (),
) -> ImportResult:
    """Write one evaluation set per dataset of the release at ``root`` under ``out`` and
    ``out/suite.json``; datasets with missing parts are skipped and listed with why.
    ``datasets`` limits the import to those names (default: all 78)."""
    root, out = Path(root).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise ReleaseError(f"MMEB-V2 release folder not found: {root}")
    wanted = set(datasets)
    unknown = wanted - {d.dataset for d in mmeb_v2()}
    if unknown:
        raise ReleaseError(f"not MMEB-V2 datasets: {sorted(unknown)}")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Any]] = {}
    skipped: dict[str, dict[str, Any]] = {}
    for item in mmeb_v2():
        if wanted and item.dataset not in wanted:
            continue
        folder = out / item.dataset
        shutil.rmtree(folder, ignore_errors=True)
        builder = DatasetBuilder(item, root)
        notes = Annotations(root, item)
        try:
            if item.parser.startswith("visdoc"):
                parse_visdoc(builder, notes, folder / "pages")
            else:
                PARSE[item.parser](builder, notes)
        except FileNotFoundError as error:  # not in this release folder at all
            skipped[item.dataset] = {"reason": str(error), "counts": {}, "kind": "absent"}
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if not builder.queries and not builder.problems:
            builder.problems.add("no_queries", "every row was left out")
        if builder.problems:
            skipped[item.dataset] = {
                "reason": builder.problems.describe(),
                "counts": dict(builder.problems.counts),
                "kind": "incomplete",
            }
            shutil.rmtree(folder, ignore_errors=True)
            continue
        meta = {
            "name": item.dataset,
            "category": item.category,
            "source": "mmeb-v2",
            "media_root": str(builder.media_root),
            "release": release,
            "annotations_digest": notes.digest(release),
            "frames": frames,
            # Images are embedded within the model's visual-token budget (its
            # model.max_visual_tokens, which every report records); the benchmark sets none.
            "max_visual_tokens": None,
            "candidates": item.candidates,
            "metric": item.metric,
            "queries": len(builder.queries),
            "candidate_count": len(builder.candidates),
            "benchmark_queries": item.queries,
            "notes": dict(builder.notes),
        }
        write_eval_folder(folder, builder.queries, builder.candidates, meta)
        written[item.dataset] = meta
    suite = {
        "benchmark": "MMEB-V2",
        "release": release,
        "root": str(root),
        "frames": frames,
        "datasets": written,
        "skipped": skipped,
    }
    (out / SUITE).write_text(json.dumps(suite, indent=2) + "\n", encoding="utf-8")
    return ImportResult(out, written, skipped)


def suite_skipped(paths: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """The skipped datasets recorded by every imported suite among ``paths`` (a suite
    folder or a set inside one)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        for candidate in (Path(path), Path(path).parent):
            suite = candidate / SUITE
            if suite.is_file():
                out.update(json.loads(suite.read_text()).get("skipped", {}))
                break
    return out

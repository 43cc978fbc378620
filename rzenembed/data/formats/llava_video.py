"""Video caption and QA sets in the LLaVA conversation layout (LLaVA-Hound, VideoChat-Flash).

A row is ``{id, video, conversations: [{from: human, value: "<video>\\n..."}, {from: gpt,
value: ...}]}`` where ``video`` is an mp4 (or other container decord reads) or a folder of
frame images, relative to the source folder. What a row becomes follows the source's task
group: ``video_retrieval`` (caption sets) gives text -> video, the gpt turn (the caption)
as the query and the video as the positive; any other group (``video_qa``) gives (video +
question) -> answer, the human turn without its ``<video>`` token as the question. Only
the first human/gpt exchange is used. A frame folder is read in natural order
(``frame_2`` before ``frame_10``) and sampled like a video (``model.video_frames``).
"""

from __future__ import annotations

import re
from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats.base import JSONL_SUFFIXES, SourceFormat, rejected
from rzenembed.data.schema import media, side

FIELDS = "{id, video, conversations: [{from: human, value: '<video>...'}, {from: gpt, value}]}"
VIDEO_TOKEN = re.compile(r"<video>\s*")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def exchange(conversations: Any) -> tuple[str, str] | None:
    """The first (human, gpt) turn pair's texts, or None."""
    if not isinstance(conversations, list):
        return None
    human = next(
        (t for t in conversations if isinstance(t, dict) and t.get("from") == "human"), None
    )
    if human is None:
        return None
    after = conversations[conversations.index(human) + 1 :]
    reply = next((t for t in after if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if reply is None:
        return None
    return str(human.get("value") or ""), str(reply.get("value") or "")


def video_item(path: str) -> dict[str, Any]:
    """An mp4 (``video``) or a folder of frames (``frames`` with the folder as its URI)."""
    if path.lower().endswith(VIDEO_SUFFIXES):
        return media("video", path)
    return media("frames", path.rstrip("/"))


def convert(raw: Any, source: SourceConfig, position: int, sink: Any = None) -> list[Any]:
    if not isinstance(raw, dict) or "video" not in raw or "conversations" not in raw:
        return [rejected("schema_invalid", f"not a LLaVA video row; expected {FIELDS}", raw)]
    turns = exchange(raw.get("conversations"))
    if turns is None:
        return [rejected("schema_invalid", "no human turn followed by a gpt turn", raw)]
    path = raw.get("video")
    if not isinstance(path, str) or not path.strip():
        return [rejected("no_video", "the row names no video", raw)]
    question = VIDEO_TOKEN.sub("", turns[0]).strip()
    answer = turns[1].strip()
    if not answer:
        return [rejected("text_empty", "the gpt turn is empty", raw)]
    video = video_item(path.strip())
    row_id = str(raw.get("id") or f"{source.name}-{position:08d}")
    if source.task_group == "video_retrieval":
        query = side(answer, source.query_instruction)
        positive = side("", source.positive_instruction, [video])
    else:
        if not question:
            return [rejected("text_empty", "the human turn has no question", raw)]
        query = side(question, source.query_instruction, [video])
        positive = side(answer, source.positive_instruction)
    return [{"id": row_id, "query": query, "positive": positive, "negatives": []}]


FORMAT = SourceFormat(
    "llava-video",
    JSONL_SUFFIXES,
    FIELDS,
    convert,
    lambda raw: isinstance(raw, dict) and "video" in raw and "conversations" in raw,
)

"""Train one tiny stage and soup it; the digests as a dict (``train_and_soup``).

``test_reproducible_training.py`` runs it once in its own process and once as a process of
its own under another ``PYTHONHASHSEED``:
``python -m tests.reproduce_stage CONFIG.json STAGE_MANIFEST_URI`` prints the dict as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rzenembed.config import PipelineConfig, config_from_dict
from rzenembed.modeling.digest import folder_digest
from rzenembed.prep.mixture import StageManifest
from rzenembed.soup import soup
from rzenembed.training.stages import output_root, run_stage1

# A string whose hash differs between processes unless their hash seeds are equal.
HASH_PROBE = "rzenembed-hash-probe"


def train_and_soup(cfg: PipelineConfig, manifest_uri: str) -> dict[str, Any]:
    """Stage 1 on the running Ray, then the soup of its one adapter."""
    result = run_stage1(cfg, StageManifest.load(manifest_uri))
    souped = soup([result.adapter_uri], Path(output_root(cfg)) / "soup")
    return {
        "adapter": folder_digest(result.adapter_uri),
        "soup": folder_digest(souped.path),
        "adapter_dir": result.adapter_uri,
        "hash_probe": hash(HASH_PROBE),
    }


def main(config_path: str, manifest_uri: str) -> None:
    from rzenembed.compute.connect import ensure_ray

    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    ensure_ray(num_cpus=1)
    print(json.dumps(train_and_soup(cfg, manifest_uri)))


if __name__ == "__main__":
    main(*sys.argv[1:3])

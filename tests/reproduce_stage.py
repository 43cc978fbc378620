"""Train one tiny stage and soup it, in a process of its own; print the digests as JSON.

Run by ``test_reproducible_training.py`` under different ``PYTHONHASHSEED`` values:
``python -m tests.reproduce_stage CONFIG.json STAGE_MANIFEST_URI``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rzenembed.config import config_from_dict
from rzenembed.modeling.digest import folder_digest
from rzenembed.prep.mixture import StageManifest
from rzenembed.soup import soup
from rzenembed.training.stages import output_root, run_stage1


def main(config_path: str, manifest_uri: str) -> None:
    from rzenembed.compute.connect import ensure_ray

    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    ensure_ray(num_cpus=1)
    result = run_stage1(cfg, StageManifest.load(manifest_uri))
    souped = soup([result.adapter_uri], Path(output_root(cfg)) / "soup")
    print(
        json.dumps(
            {
                "adapter": folder_digest(result.adapter_uri),
                "soup": folder_digest(souped.path),
                "adapter_dir": result.adapter_uri,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""``train_bench.py --gpu`` as the GPU check's ``bench`` part runs it.

On CUDA it is ``train_bench.main(argv)`` unchanged. With ``--dry-run`` (CPU, the 2-layer
config) the backbone is built in float32 instead of bfloat16: CPUs without AVX512-BF16 or
AMX run bfloat16 matmuls through a slow fallback (this 2-core AMD EPYC VM: 0.8 GFLOP/s in
bfloat16 against 68 GFLOP/s in float32 for a 1024 x 1536 x 1536 matmul), which made the
dry run's single bench step take 5-7 minutes instead of 30 s. The dry run measures
nothing, so the dtype changes nothing it proves: it still runs the input construction,
LoRA, the GradCache step, the optimiser and the report, and the check's MFU floor and
memory ceiling on the figures it prints.
"""

from __future__ import annotations

import sys

import torch
import train_bench


def main(argv: list[str]) -> None:
    if "--dry-run" in argv:
        build = train_bench.build_gpu_embedder

        def float32_on_cpu(config, device, dtype, *rest, **kwargs):
            dtype = torch.float32 if torch.device(device).type == "cpu" else dtype
            return build(config, device, dtype, *rest, **kwargs)

        train_bench.build_gpu_embedder = float32_on_cpu
        print("gpu-check dry run: the backbone in float32 on CPU (bf16 matmuls are slow here)")
    train_bench.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env bash
# One prepared GPU check, end to end in under 10 minutes on one CUDA GPU, one table at the end:
#   bash scripts/gpu_check.sh                        # bench (CoSwin-T inference, CoSwin-B UniCL step MFU),
#                                                    # 100 train.py steps, --fsdp / --amp fp16 / --grad_ckpt smokes
#   bash scripts/gpu_check.sh --device cpu --quick   # the same steps, tiny, on CPU
# The steps and their limits are in scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"

"""Which accelerator a shard runs on: `gpus=[0,1,...]` gives shard i the device
gpus[i % len(gpus)] through CUDA_VISIBLE_DEVICES, set before TensorFlow starts.

This takes effect in a fresh process per job (run.py itself, submitit's launchers, Ray);
the joblib launcher reuses its worker processes, where TensorFlow keeps the devices it
first saw, so a change there is reported instead of silently ignored.
"""

from __future__ import annotations

import logging
import os
import sys

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

_started_with: str | None = None  # CUDA_VISIBLE_DEVICES when this process first started TensorFlow


def device_for(gpus, index: int) -> str:
    return str(int(gpus[index % len(gpus)]))


def assign(gpus, shard) -> str | None:
    """Set CUDA_VISIBLE_DEVICES for this shard (gpus not empty); returns what the job sees.
    Refused when TensorFlow already runs in this process on other devices."""
    global _started_with
    tf_running = "tensorflow" in sys.modules
    if tf_running and _started_with is None:
        _started_with = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not list(gpus):
        return os.environ.get("CUDA_VISIBLE_DEVICES")
    device = device_for(gpus, int(shard.index))
    if tf_running and _started_with != device:
        raise PipelineError(f"shard {shard.index} should run on GPU {device}, but TensorFlow already runs in this "
                            f"process on CUDA_VISIBLE_DEVICES={_started_with!r} (a launcher that reuses processes): "
                            f"use hydra/launcher=shards_gpus, which starts one process per job")
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    if not tf_running:
        _started_with = device
    logger.info("shard %d of %d on GPU %s (CUDA_VISIBLE_DEVICES=%s)", shard.index, shard.count, device, device)
    return device

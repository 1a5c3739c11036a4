"""Workaround for mmengine 0.10.7 on a CPU-only torch 2.13, applied when the plugin is imported.

mmengine's PyTorch launcher calls ``torch.cuda.set_device`` unconditionally, which raises on a
CPU-only torch. Without CUDA we initialise the process group directly (use the ``gloo`` backend,
``env_cfg = dict(dist_cfg=dict(backend='gloo'))``, and
``model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)``).
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist


def _init_dist_pytorch_cpu(backend, init_backend="torch", **kwargs) -> None:
    if init_backend != "torch":
        raise NotImplementedError(f"init_backend={init_backend!r} needs CUDA")
    torch_dist.init_process_group(backend=backend, **kwargs)


def allow_cpu_distributed() -> None:
    """Let mmengine's ``pytorch`` launcher run on a CPU-only torch (no ``cuda.set_device``)."""
    if torch.cuda.is_available():
        return
    import mmengine.dist.utils as dist_utils

    dist_utils._init_dist_pytorch = _init_dist_pytorch_cpu

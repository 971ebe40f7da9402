"""The platform registry: picks the PagedAttention implementation at startup.

Each vendor folder registers a factory here with one line; the engine only
ever talks to `get()` / `detect()` and the contract in `interface.py`.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Callable, Optional

from platforms.interface import AttentionBackend, Platform

__all__ = ["AttentionBackend", "Platform", "register", "get", "names", "detect"]

logger = logging.getLogger(__name__)

_FACTORIES: dict[str, Callable[[], Platform]] = {}
_INSTANCES: dict[str, Platform] = {}


def register(name: str, factory: Callable[[], Platform]) -> None:
    """Register a platform factory under `name` (later registrations replace)."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def names() -> list[str]:
    return list(_FACTORIES)


def get(name: str) -> Platform:
    """The platform called `name`; works whether or not its hardware is here."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown platform {name!r}; known platforms: {', '.join(names())}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def _lazy(module: str, cls: str) -> Callable[[], Platform]:
    # Vendor modules are imported only when asked for, so a missing vendor
    # stack (triton, openvino, ...) never breaks the others.
    def factory() -> Platform:
        return getattr(importlib.import_module(module), cls)()
    return factory


def detect(name: Optional[str] = None) -> Platform:
    """Pick a platform: explicit name > $PAGEDLLM_DEVICE > cuda > rocm > xpu > cpu.

    Logs which one it picked and why. "auto" counts as no name.
    """
    if name and name != "auto":
        platform, why = get(name), f"asked for explicitly ({name!r})"
    elif os.environ.get("PAGEDLLM_DEVICE", "auto") != "auto":
        env = os.environ["PAGEDLLM_DEVICE"]
        platform, why = get(env), f"PAGEDLLM_DEVICE={env}"
    else:
        platform, why = _autodetect()
    logger.info("platform %s selected: %s", platform.name, why)
    platform.detect_reason = why  # type: ignore[attr-defined]
    return platform


def _autodetect() -> tuple[Platform, str]:
    reasons = []
    for candidate in ("cuda", "rocm", "xpu"):
        if candidate not in _FACTORIES:
            continue
        try:
            platform = get(candidate)
            if platform.is_available():
                return platform, f"{candidate} hardware found"
            reasons.append(platform.unavailable_reason())
        except Exception as error:  # a vendor stack that fails to load counts as absent
            reasons.append(f"platform {candidate!r} failed to load "
                           f"({type(error).__name__}: {error})")
    return get("cpu"), f"no accelerator found ({'; '.join(reasons)})"


# One line per vendor.
register("cpu", _lazy("platforms.cpu", "CpuPlatform"))
register("cuda", _lazy("platforms.cuda", "CudaPlatform"))
register("rocm", _lazy("platforms.rocm", "RocmPlatform"))
register("xpu", _lazy("platforms.xpu", "XpuPlatform"))

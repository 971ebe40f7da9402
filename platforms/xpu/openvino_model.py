"""One OpenVINO PagedAttention operation as a compiled model, shared with torch.

OpenVINO's `PagedAttentionExtension` (experimental; openvino 2026.4 takes 28
inputs) is wrapped in a model of that single operation per (device, dtype,
num_heads, num_kv_heads, head_size), compiled once and cached. Its runtime
inputs are torch tensors wrapped in place (an `ov.Tensor` over the torch
buffer, no copy); the output is written straight into a torch tensor.

Tensor layouts the operation sees:
- query `[num_tokens, num_heads * head_size]`, key/value
  `[num_tokens, num_kv_heads * head_size]`;
- key_cache/value_cache `[num_blocks, num_kv_heads, block_size, head_size]`
  (the plugin picks the block size: 32 on CPU; `PagedAttentionModel` reads
  it back from the compiled model);
- past_lens `[num_seqs]` (cached tokens before this step),
  subsequence_begins `[num_seqs + 1]` (= query_start_loc), block_indices
  `[total used blocks]` (each sequence's used block ids, concatenated),
  block_indices_begins `[num_seqs + 1]`, all int32;
- scale f32 and max_context_len int32 scalars.

The operation's own cache write is switched off (`write_kv_cache`): the
backend stores K/V by `slot_mapping`, as the platform contract says.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from platforms.xpu import require

_TYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
               torch.int32: "i32"}
#: OPTIMIZATION_CAPABILITIES entry a device lists when it computes in that type
_CAPABILITIES = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}
_RUNTIME_INPUTS = ("query", "key", "value", "key_cache", "value_cache", "past_lens",
                   "subsequence_begins", "block_indices", "block_indices_begins", "scale",
                   "max_context_len")
# Inputs 13..27 switch on features pagedllm does not use (score outputs, cache
# rotation, XAttention, attention sinks, adaptive R-KV eviction, token types,
# speculative-decoding bias); empty or neutral values turn them off.
_UNUSED_FEATURES = (
    np.zeros(0, np.int32),           # score_aggregation_window
    np.zeros(0, np.int32),           # rotated_block_indices
    np.zeros((0, 0), np.int32),      # rotation_deltas
    np.zeros((0, 0), np.float32),    # rotation_trig_lut
    np.zeros(0, np.float32),         # xattention_threshold
    np.int32(64),                    # xattention_block_size
    np.int32(8),                     # xattention_stride
    np.zeros((0, 0, 0, 0), np.float32),  # sinks
    np.int32(0),                     # adaptive_rkv_start_size
    np.zeros(0, np.int32),           # adaptive_rkv_evictable_sizes
    np.zeros(0, np.int32),           # adaptive_rkv_diversity_block_set_indices
    np.zeros(0, np.int32),           # adaptive_rkv_diversity_block_set_indices_begins
    np.zeros(0, np.int32),           # token_type_ids
    np.zeros(0, np.uint8),           # qq_bias
    np.zeros(0, np.int32),           # qq_bias_begins
)


def openvino():
    return require("openvino", "pip install openvino==2026.4.1")


@dataclass(frozen=True)
class ModelKey:
    device: str  # OpenVINO device name: "CPU", "GPU"
    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_size: int


class PagedAttentionModel:
    """A compiled one-operation model and its infer request (not thread-safe)."""

    def __init__(self, key: ModelKey):
        ov = openvino()
        core = ov.Core()
        model = _build_model(ov, key)
        self.compiled = core.compile_model(model, key.device, _compile_config(core, key))
        self.request = self.compiled.create_infer_request()
        self.cache_shape = _check_cache_input(self.compiled, key)

    @property
    def block_size(self) -> int:
        return self.cache_shape[2]

    def run(self, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Infer with `tensors` (by runtime input name) into `out [num_tokens, hidden]`."""
        for index, name in enumerate(_RUNTIME_INPUTS):
            self.request.set_input_tensor(index, _shared(tensors[name]))
        self.request.set_output_tensor(0, _shared(out))
        self.request.infer()


def _shared(tensor: torch.Tensor):
    """An ov.Tensor over `tensor`'s memory, no copy (contiguous CPU tensors only)."""
    ov = openvino()
    return ov.Tensor(tensor.reshape(-1).view(torch.uint8).numpy(), list(tensor.shape),
                     getattr(ov.Type, _TYPE_NAMES[tensor.dtype]))


@functools.lru_cache(maxsize=None)
def compiled_model(key: ModelKey) -> PagedAttentionModel:
    return PagedAttentionModel(key)


def _build_model(ov, key: ModelKey):
    ops = ov.opset13
    element_type = getattr(ov.Type, _TYPE_NAMES[key.dtype])

    def parameter(name: str, shape: list[int], type_):
        node = ops.parameter(ov.PartialShape(shape), type_, name=name)
        node.output(0).set_names({name})
        return node

    q_width, kv_width = key.num_heads * key.head_size, key.num_kv_heads * key.head_size
    params = [parameter("query", [-1, q_width], element_type),
              parameter("key", [-1, kv_width], element_type),
              parameter("value", [-1, kv_width], element_type),
              # precision and shape are set by the plugin from the compile config
              parameter("key_cache", [-1, -1, -1, -1], ov.Type.dynamic),
              parameter("value_cache", [-1, -1, -1, -1], ov.Type.dynamic)]
    params += [parameter(name, [-1], ov.Type.i32) for name in _RUNTIME_INPUTS[5:9]]
    scale = parameter("scale", [], ov.Type.f32)
    max_context_len = parameter("max_context_len", [], ov.Type.i32)
    inputs = [*params, scale, ops.constant(np.int32(0)),  # sliding_window: off
              ops.constant(np.zeros(0, np.float32)),  # alibi_slopes: none
              max_context_len, *(ops.constant(value) for value in _UNUSED_FEATURES)]
    try:
        attention = ov.op._PagedAttentionExtension([node.output(0) for node in inputs])
    except RuntimeError as error:
        raise RuntimeError(f"openvino {ov.__version__} rejected the PagedAttentionExtension "
                           f"inputs this backend builds (written for 2026.4): {error}") from error
    attention.set_attribute("write_kv_cache", False)
    for field, value in (("num_k_heads", key.num_kv_heads), ("k_head_size", key.head_size),
                         ("num_v_heads", key.num_kv_heads), ("v_head_size", key.head_size)):
        attention.get_rt_info()[field] = value
    return ov.Model([attention.output(0)], [*params, scale, max_context_len])


def _compile_config(core, key: ModelKey) -> dict[str, str]:
    """Caches in the model dtype (the plugins default to u8); compute in it if the
    device can, else in f32 (e.g. f16 on CPUs without FP16 arithmetic).

    f16 on the CPU plugin always computes in f32: where the CPU has FP16
    arithmetic (AVX512-FP16 / AMX-FP16 Xeons) the plugin's f16 paged attention
    gave NaN or errors of ~1e3 on 3 of the 20 conformance rows (OpenVINO 2026.4.1).
    """
    name = _TYPE_NAMES[key.dtype]
    capabilities = core.get_property(key.device, "OPTIMIZATION_CAPABILITIES")
    native = _CAPABILITIES[key.dtype] in capabilities
    if key.dtype == torch.float16 and key.device == "CPU":
        native = False
    compute = name if native else "f32"
    return {"KEY_CACHE_PRECISION": name, "VALUE_CACHE_PRECISION": name,
            "INFERENCE_PRECISION_HINT": compute}


def _check_cache_input(compiled, key: ModelKey) -> tuple[int, ...]:
    """The compiled cache input `(-1, num_kv_heads, block_size, head_size)`, checked."""
    port = compiled.input("key_cache")
    shape = tuple(dim.get_length() if dim.is_static else -1 for dim in port.get_partial_shape())
    element_type = port.get_element_type().get_type_name()
    if (len(shape) != 4 or shape[1] != key.num_kv_heads or shape[3] != key.head_size
            or element_type != _TYPE_NAMES[key.dtype]):
        raise RuntimeError(
            f"OpenVINO's {key.device} plugin wants the KV cache as {element_type} {shape}; "
            f"this backend stores {_TYPE_NAMES[key.dtype]} [num_blocks, {key.num_kv_heads}, "
            f"block_size, {key.head_size}]")
    return shape

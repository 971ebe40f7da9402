"""Linear weights reordered once for oneDNN, for bfloat16 inference on CPUs.

On a CPU, `F.linear` hands oneDNN the plain `[out_features, in_features]`
weight on every call, and oneDNN reorders it into its blocked GEMM layout each
time; at decode batch sizes that reorder costs about as much as the product
itself. `pack_linear_weights(model)` reorders every linear weight once, after
loading (the layers' plain weights are then dropped, so memory does not
double); `linear(...)` multiplies with the packed weight. The results are
bit-identical to `F.linear` (tests/test_models.py).

A packed weight is an opaque oneDNN tensor: it stays on the CPU, outside the
module's parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: the batch size oneDNN chooses the packed layout for (any batch computes correctly)
BATCH_SIZE_HINT = 32


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Packing pays for bfloat16 on CPUs whose oneDNN computes it natively (AVX512-BF16,
    AMX); float32 GEMMs gain nothing from it."""
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight [out_features, in_features]` in oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_SIZE_HINT)


def linear(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           packed_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, from `packed_weight` when the layer has one."""
    if packed_weight is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def pack_linear_weights(model: nn.Module) -> int:
    """Pack the weight of every linear layer and LM head of `model`; returns how many.

    Linear layers drop their plain weight. A vocabulary embedding keeps it (it
    also looks up token embeddings) and packs a copy for its logits.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.packed_weight = pack(module.weight)
            module.weight = None
            count += 1
        elif callable(getattr(module, "logits", None)) and hasattr(module, "packed_weight"):
            module.packed_weight = pack(module.weight)
            count += 1
    return count

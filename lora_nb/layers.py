"""A LoRA layer: a frozen nn.Linear plus a trainable low-rank update, y = W x + scale * (alpha/r) * B A x."""

import math

import torch
from torch import nn


def finite_number(value, name: str) -> float:
    """``value`` as a float; a ValueError naming ``name`` if it is not a finite number (a string is not)."""
    try:
        number = None if isinstance(value, (str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


class LoRALinear(nn.Module):
    """Wraps ``base`` (frozen) and adds ``lora_B(lora_A(x))``, computed in activation space.

    ``scaling = alpha / rank`` is fixed at creation and saved with the weights; ``scale`` is a runtime
    knob (1.0 by default, 0.0 gives exactly the base output). ``merge()`` folds the update into
    ``base.weight`` for inference; ``unmerge()`` restores the original weight bit for bit. Merging twice,
    or unmerging an unmerged layer, raises: in a notebook that is almost always a cell run out of order.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        init: str = "kaiming",
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = finite_number(rank if alpha is None else alpha, "alpha")
        self.scaling = self.alpha / rank
        self.scale = 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # fp32 even under an fp16/bf16 base: GradScaler refuses to unscale fp16 gradients, and small
        # updates to fp16 factors would round away.
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)  # A: (r, d_in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)  # B: (d_out, r)
        if init == "kaiming":  # peft's default, the same as nn.Linear's own init
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / rank)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: a fresh adapter leaves the model unchanged
        # The pre-merge weight, kept while merged. A buffer so .to(device) moves it; not saved in state_dict.
        self.register_buffer("_unmerged_weight", None, persistent=False)

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.scale == 0:  # merged: the update is already inside base.weight
            return y
        delta = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (self.scale * self.scaling * delta).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update this layer adds to ``base.weight``: scale * alpha/r * B @ A, (d_out, d_in), fp32."""
        return self.scale * self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update (at the current ``scale``) into ``base.weight``."""
        if self.merged:
            raise RuntimeError("LoRALinear is already merged; unmerge() first")
        # Restoring a copy is exact; subtracting the delta again would not be (rounding, worst in fp16).
        self._unmerged_weight = self.base.weight.detach().clone()
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original ``base.weight`` back, bit for bit."""
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged")
        self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"

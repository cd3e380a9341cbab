"""LoRA layers: a frozen nn.Linear or nn.Conv2d plus a trainable low-rank update, y = W x + s * B A x, with
s = scale * alpha / r (rsLoRA: alpha / sqrt(r)); DoRA rescales each output channel by a learned magnitude.
"""

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


class LoRALayer(nn.Module):
    """Wraps ``base`` (frozen) and adds ``lora_B(lora_A(x))``, computed in activation space.

    ``scaling`` is ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``, peft's rank-stabilised
    LoRA), fixed at creation and saved with the weights; ``scale`` is a runtime knob (1.0 by default).
    ``merge()`` folds the update into ``base.weight`` for inference; ``unmerge()`` restores the original
    weight bit for bit. Merging twice, or unmerging an unmerged layer, raises: in a notebook that is almost
    always a cell run out of order.

    ``use_dora`` (peft's DoRA) makes the layer's weight ``m * V / ||V||`` with ``V = W + s * B A``, the norm
    taken per output channel and ``m`` (``lora_magnitude_vector``) trained; ``m`` starts at ``||W||``, so a
    fresh layer is the base. ``scale`` only scales ``B A``: at scale 0 the weight is ``m * W / ||W||``, the
    base only while ``m`` is still ``||W||`` (``reset_magnitude()`` makes it so). As in peft the norm is
    detached (the DoRA paper's section 4.3: no gradient through it, far less memory), and dropout acts on
    the low-rank branch only.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_dora: bool = False,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = finite_number(rank if alpha is None else alpha, "alpha")
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if self.use_rslora else rank)
        self.scale = 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # fp32 even under an fp16/bf16 base: GradScaler refuses to unscale fp16 gradients, and small
        # updates to fp16 factors would round away.
        self.lora_A, self.lora_B = self.make_factors(base, rank, base.weight.device)
        if init == "kaiming":  # peft's default, the same as nn.Linear's own init
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / rank)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: a fresh adapter leaves the model unchanged
        # peft's name, so the tensor's key in a file is the key diffusers and peft read.
        self.register_parameter("lora_magnitude_vector", None)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty_like(self.weight_norm(0.0)))
            self.reset_magnitude()
        # The pre-merge weight, kept while merged. A buffer so .to(device) moves it; not saved in state_dict.
        self.register_buffer("_unmerged_weight", None, persistent=False)

    # What a kind of layer defines: its two factors, and how a per-channel vector meets its output.
    def make_factors(self, base: nn.Module, rank: int, device) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def per_channel(self, vector: torch.Tensor) -> torch.Tensor:
        """A (d_out,) vector shaped to broadcast against this layer's output."""
        raise NotImplementedError

    @staticmethod
    def factor_shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and B for LoRA of rank ``rank`` on ``base``."""
        raise NotImplementedError

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def lora_weight(self) -> torch.Tensor:
        """B A as a weight of ``base.weight``'s shape, fp32, unscaled."""
        a, b = self.lora_A.weight, self.lora_B.weight
        return (b.flatten(1) @ a.flatten(1)).view(self.base.weight.shape)  # (d_out, r) @ (r, d_in * k * k)

    def weight_norm(self, s: float) -> torch.Tensor:
        """||W + s B A|| per output channel, fp32, in the magnitude's shape (peft's)."""
        weight = self.base.weight.float() + s * self.lora_weight()
        return self.magnitude_shaped(weight.flatten(1).norm(dim=1))

    def magnitude_shaped(self, norms: torch.Tensor) -> torch.Tensor:
        """peft's shape of a magnitude vector: (d_out,) for a Linear, (1, d_out, 1, 1) for a Conv2d."""
        return norms

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: set m = ||W|| (with B = 0, or at scale 0, the layer is then exactly the base)."""
        self.lora_magnitude_vector.copy_(self.weight_norm(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or (self.scale == 0 and not self.use_dora):  # merged: the update is in base.weight
            return y
        s = self.scale * self.scaling
        delta = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        if not self.use_dora:
            return y + (s * delta).to(y.dtype)
        # m / ||W + s B A|| per channel, applied to W x (the base output less its bias) and to s B A x.
        factor = self.per_channel((self.lora_magnitude_vector / self.weight_norm(s).detach()).flatten())
        bias = 0 if self.base.bias is None else self.per_channel(self.base.bias.float())
        return y + ((factor - 1) * (y.float() - bias) + factor * s * delta).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The weight this layer computes with (at the current ``scale``), fp32, ``base.weight``'s shape."""
        s = self.scale * self.scaling
        weight = self.base.weight.float() + s * self.lora_weight()
        if self.use_dora:
            factor = self.lora_magnitude_vector / self.weight_norm(s)
            weight = factor.flatten().view(-1, *[1] * (weight.dim() - 1)) * weight
        return weight

    def delta_weight(self) -> torch.Tensor:
        """What this layer adds to ``base.weight``: plain LoRA scale * scaling * B A, fp32."""
        if not self.use_dora:
            return self.scale * self.scaling * self.lora_weight()
        return self.merged_weight() - self.base.weight.float()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update (at the current ``scale``) into ``base.weight``."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; unmerge() first")
        # Restoring a copy is exact; subtracting the delta again would not be (rounding, worst in fp16).
        weight = self.base.weight
        new = weight + self.delta_weight().to(weight.dtype) if not self.use_dora else self.merged_weight()
        self._unmerged_weight = weight.detach().clone()
        weight.copy_(new)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original ``base.weight`` back, bit for bit."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    def extra_repr(self) -> str:
        variant = ", rslora" * self.use_rslora + ", dora" * self.use_dora
        return f"rank={self.rank}, alpha={self.alpha:g}{variant}, scale={self.scale:g}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA on an nn.Linear: A: (r, d_in), B: (d_out, r)."""

    def make_factors(self, base: nn.Linear, rank: int, device) -> tuple[nn.Linear, nn.Linear]:
        factory = {"device": device, "dtype": torch.float32}
        return (
            nn.Linear(base.in_features, rank, bias=False, **factory),  # A: (r, d_in)
            nn.Linear(rank, base.out_features, bias=False, **factory),  # B: (d_out, r)
        )

    @staticmethod
    def factor_shapes(base: nn.Linear, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, base.in_features), (base.out_features, rank)  # A, B

    def per_channel(self, vector: torch.Tensor) -> torch.Tensor:
        return vector  # the output's last dimension is the channel


class LoRAConv2d(LoRALayer):
    """LoRA on an nn.Conv2d (kohya's 1x1 proj_in/proj_out, LoCon's 3x3 resnet convs), as peft builds it: A
    is a convolution like the base's (kernel, stride, padding) with r output channels, A: (r, c_in, k, k);
    B a 1x1 convolution r -> c_out, B: (c_out, r, 1, 1). So B A x is the convolution with the weight B A."""

    def make_factors(self, base: nn.Conv2d, rank: int, device) -> tuple[nn.Conv2d, nn.Conv2d]:
        if base.groups != 1:
            raise ValueError(f"LoRAConv2d needs an ungrouped convolution, got groups={base.groups}")
        factory = {"device": device, "dtype": torch.float32}
        a = nn.Conv2d(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, **factory,
        )  # fmt: skip
        return a, nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)

    @staticmethod
    def factor_shapes(base: nn.Conv2d, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)  # A, B

    def per_channel(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.view(-1, 1, 1)  # (c_out, 1, 1) against (N, c_out, H, W)

    def magnitude_shaped(self, norms: torch.Tensor) -> torch.Tensor:
        return norms.view(1, -1, 1, 1)


LORA_CLASSES: dict[type[nn.Module], type[LoRALayer]] = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def lora_class(base: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class that wraps ``base``, or None if LoRA cannot go on a module of its kind."""
    return next((cls for kind, cls in LORA_CLASSES.items() if isinstance(base, kind)), None)

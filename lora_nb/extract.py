"""LoRA by SVD: extract an adapter from a full fine-tune, or cut an adapter down to a lower rank.

Both approximate a weight change ΔW: (d_out, d_in) by B @ A of rank r. The truncated SVD is the best rank-r
approximation (Eckart-Young), and its error is exactly what it drops: ‖ΔW - B A‖_F = sqrt(Σ_{i>r} σ_i²).
The results use the diffusers keys of ``lora_nb.formats`` with alpha = rank (scaling 1): that is what every
loader, this package's and diffusers', assumes when a file carries no alpha, so they need no metadata.
"""

import torch
from torch import nn

from .convert import split_layers
from .inject import UNET_ATTENTION, Targets, find_targets, lora_layers

StateDict = dict[str, torch.Tensor]


def _factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """B: (d_out, rank) and A: (rank, d_in) from an SVD U S Vᵀ, keeping the top ``rank`` directions.

    √S goes to each side rather than all of S to B: the two factors then have equal norms, so training on
    from them moves both alike under one learning rate, and neither over- or underflows in fp16. With fewer
    than ``rank`` directions (a small layer, or an adapter already below ``rank``) zeros fill the rest: every
    layer gets the same rank, so alpha = rank holds for the whole file.
    """
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b, a = u.new_zeros(u.shape[0], rank), vh.new_zeros(rank, vh.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b.contiguous(), a.contiguous()


def _relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """‖ΔW - B A‖_F / ‖ΔW‖_F, measured (not taken from the singular values); 0 for ΔW = 0."""
    norm = torch.linalg.matrix_norm(delta)
    return 0.0 if norm == 0 else (torch.linalg.matrix_norm(delta - b @ a) / norm).item()


@torch.no_grad()
def extract_lora(
    base: nn.Module,
    tuned: nn.Module,
    rank: int,
    target_modules: Targets = UNET_ATTENTION,
    prefix: str = "unet",
) -> tuple[StateDict, dict[str, float]]:
    """A rank-``rank`` LoRA approximating ``tuned - base`` on the targeted Linear layers.

    Returns (state dict, report): ``f"{prefix}.{layer}.lora_A.weight"`` / ``lora_B.weight`` in fp32 on the
    CPU (alpha = rank), and {f"{prefix}.{layer}": relative Frobenius error}. Layers the fine-tune left
    unchanged (ΔW = 0) are skipped, in both: loading the result leaves them as they are, which is exact.
    """
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    for role, model in (("base", base), ("tuned", tuned)):
        if lora_layers(model):
            raise ValueError(
                f"{role} has LoRA layers; extract from plain models (resize_lora changes an adapter)"
            )
    names, tuned_names = find_targets(base, target_modules), find_targets(tuned, target_modules)
    for name in sorted(set(names) ^ set(tuned_names)):
        where = "base" if name in names else "tuned"
        raise ValueError(f"{name}: only the {where} model has this layer; are they the same architecture?")
    state, report = {}, {}
    for name in names:
        w0, w1 = base.get_submodule(name).weight, tuned.get_submodule(name).weight
        if w0.shape != w1.shape:
            raise ValueError(f"{name}: base weight is {tuple(w0.shape)}, tuned is {tuple(w1.shape)}")
        delta = w1.float() - w0.float()  # ΔW: (d_out, d_in); fp32 even for fp16 models, for the SVD
        if not delta.any():
            continue
        b, a = _factors(*torch.linalg.svd(delta, full_matrices=False), rank)
        state[f"{prefix}.{name}.lora_A.weight"] = a.cpu()
        state[f"{prefix}.{name}.lora_B.weight"] = b.cpu()
        report[f"{prefix}.{name}"] = _relative_error(delta, b, a)
    if not state:
        raise ValueError(f"tuned equals base on every targeted layer ({len(names)}): nothing to extract")
    return state, report


def _svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of B @ A, B: (d_out, r), A: (r, d_in), from one r x r SVD instead of a d_out x d_in one.

    With B = Qb Rb and Aᵀ = Qa Ra (QR; Qb, Qa have orthonormal columns), B A = Qb (Rb Raᵀ) Qaᵀ; the SVD
    U S Vᵀ of the small core Rb Raᵀ gives B A = (Qb U) S (Qa V)ᵀ, itself an SVD. For SD's 1280-wide layers
    at rank 16 that is milliseconds instead of a second per layer.
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


@torch.no_grad()
def resize_lora(
    state_dict: StateDict, rank: int, metadata: dict | None = None
) -> tuple[StateDict, dict[str, float]]:
    """The same adapter at rank ``rank``: each layer's ΔW = (alpha / r) B A truncated by SVD.

    ``state_dict`` holds ``<prefix>.<layer>.lora_A.weight`` / ``lora_B.weight`` keys, any prefixes
    (``unet.``, ``text_encoder.`` ...). ``metadata`` is a ``read_lora`` adapter's ``metadata``: peft
    LoraConfig kwargs with prefixed names, ``{"unet.lora_alpha": 8, "unet.alpha_pattern": {...}}``; without
    it alpha = r, as in every loader. The result has alpha = ``rank`` (the scaling is folded into the
    factors), so save it without the old metadata. Layers below ``rank`` stay exact, padded with zeros.
    Returns (state dict, {f"{prefix}.{layer}": relative Frobenius error}).
    """
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    state, report = {}, {}
    for stem, (a, b, alpha) in split_layers(state_dict, metadata).items():
        # A convolution's factors, A: (r, d_in, kh, kw) and B: (d_out, r, 1, 1), are the matrices
        # (r, d_in·kh·kw) and (d_out, r); resized as those, they take their shapes back after.
        if b.dim() == 4 and b.shape[2:] != (1, 1):
            raise ValueError(f"{stem}: lora_B is {tuple(b.shape)}; only a 1x1 lora_B can be resized")
        a_shape, b_shape = a.shape, b.shape
        a = a.float().flatten(1)
        b = b.float().flatten(1) * (alpha / a.shape[0])  # fold the scaling in: ΔW = B' A
        new_b, new_a = _factors(*_svd_of_product(b, a), rank)
        state[f"{stem}.lora_A.weight"] = new_a.view(rank, *a_shape[1:])
        state[f"{stem}.lora_B.weight"] = new_b.view(b_shape[0], rank, *b_shape[2:])
        report[stem] = _relative_error(b @ a, new_b, new_a)
    return state, report

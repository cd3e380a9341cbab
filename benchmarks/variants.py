"""DoRA and LoCon, forward + backward: ``lora_nb``'s layers against their plain LoRA and against peft's.

DoRA: ``LoRALinear(use_dora=True)`` and peft's ``lora.Linear`` with ``LoraConfig(use_dora=True)``, each
beside its own plain LoRA, on lora_layer.py's SD-like shapes. LoCon: ``LoRAConv2d`` against peft's Conv2d
LoRA on SD 1.5's convolutions: a resnet's 3x3 conv at 320 channels on 64x64 and at 640 on 32x32, and a
1x1 proj_in at 320 on 64x64. The rest as in lora_layer.py: batch 2, rank 4, alpha 4, fp32, a frozen base
with bias, an input that requires grad, and the same non-zero factors (and DoRA magnitude) in ours and
peft's, checked to give the same output before anything is timed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .common import Section, Settings, Stat, geomean, geomean_target, paired_ratio, time_interleaved
from .lora_layer import BATCH, RANK, TOKENS, WIDTHS, Holder, check_same, forward_backward

LIMIT = 1.0  # ours / peft, as for the plain linear layer
TOLERANCE = 1e-4  # largest absolute output difference allowed between ours and peft's (fp32)
CONVS = ((320, 3, 64), (640, 3, 32), (320, 1, 64))  # (channels, kernel, side): resnet 3x3s, a 1x1 proj_in


def make_pair(base: nn.Module, use_dora: bool = False) -> tuple[nn.Module, nn.Module]:
    """Ours and peft's LoRA (DoRA) on two copies of ``base``, with the same non-zero factors and magnitude."""
    from peft import LoraConfig, inject_adapter_in_model

    from lora_nb.layers import lora_class

    torch.manual_seed(0)
    ours = lora_class(base)(copy.deepcopy(base), RANK, alpha=RANK, init="gaussian", use_dora=use_dora)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["proj"], use_dora=use_dora)
    theirs = inject_adapter_in_model(config, Holder(copy.deepcopy(base))).proj
    with torch.no_grad():  # as after some training: B non-zero, the magnitude moved off ||W||
        nn.init.normal_(ours.lora_B.weight, std=0.02)
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if use_dora:
            magnitude = ours.lora_magnitude_vector
            magnitude.mul_(1 + 0.1 * torch.randn_like(magnitude))
            theirs.lora_magnitude_vector["default"].weight.copy_(magnitude)
    return ours, theirs


def assert_same(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, what: str) -> None:
    """Refuse to time two layers that compute different things."""
    difference = check_same(ours, theirs, x)
    if not difference <= TOLERANCE:  # also catches NaN
        raise AssertionError(f"lora_nb and peft differ by {difference:.3g} (> {TOLERANCE:g}) on {what}")


def time_layers(layers: dict[str, nn.Module], x: torch.Tensor, settings: Settings) -> dict[str, Stat]:
    """Forward + backward seconds per call of each layer (all shape-preserving), interleaved."""
    grad = torch.randn(x.shape)
    return time_interleaved(
        {name: forward_backward(layer, x, grad) for name, layer in layers.items()}, settings
    )


def dora_rows(settings: Settings) -> tuple[list[list[str]], list[Stat], list[Stat]]:
    rows, ratios, controls = [], [], []
    for tokens in TOKENS:
        for width in WIDTHS:
            torch.manual_seed(0)
            base, x = nn.Linear(width, width), torch.randn(BATCH, tokens, width, requires_grad=True)
            (ours, peft), (ours_dora, peft_dora) = make_pair(base), make_pair(base, use_dora=True)
            assert_same(ours, peft, x, f"Linear({width}), LoRA")
            assert_same(ours_dora, peft_dora, x, f"Linear({width}), DoRA")
            control = make_pair(base, use_dora=True)[1]  # A/A: an identical second peft DoRA layer
            layers = {"ours": ours, "ours DoRA": ours_dora, "peft": peft, "peft DoRA": peft_dora}
            t = time_layers({**layers, "control": control}, x, settings)
            ratios.append(paired_ratio(t["ours DoRA"], t["peft DoRA"]))
            controls.append(paired_ratio(t["control"], t["peft DoRA"]))
            rows.append(
                [f"({BATCH}, {tokens}, {width})", *(t[name].ms() for name in layers)]
                + [
                    paired_ratio(t["ours DoRA"], t["ours"]).ratio(),
                    paired_ratio(t["peft DoRA"], t["peft"]).ratio(),
                ]
                + [ratios[-1].ratio(), controls[-1].ratio()]
            )
    return rows, ratios, controls


def locon_rows(settings: Settings) -> tuple[list[list[str]], list[Stat], list[Stat]]:
    rows, ratios, controls = [], [], []
    for channels, kernel, side in CONVS:
        torch.manual_seed(0)
        base = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        x = torch.randn(BATCH, channels, side, side, requires_grad=True)
        ours, peft = make_pair(base)
        assert_same(ours, peft, x, f"Conv2d({channels}, {kernel}x{kernel})")
        t = time_layers({"ours": ours, "peft": peft, "control": make_pair(base)[1]}, x, settings)
        ratios.append(paired_ratio(t["ours"], t["peft"]))
        controls.append(paired_ratio(t["control"], t["peft"]))
        shape = f"{kernel}x{kernel}, ({BATCH}, {channels}, {side}, {side})"
        rows.append([shape, t["ours"].ms(), t["peft"].ms(), ratios[-1].ratio(), controls[-1].ratio()])
    return rows, ratios, controls


def benchmark(settings: Settings) -> Section:
    dora, dora_ratios, dora_controls = dora_rows(settings)
    locon, locon_ratios, locon_controls = locon_rows(settings)
    targets = [
        geomean_target(
            "DoRA linear fwd+bwd: LoRALinear(use_dora) / peft DoRA (geometric mean over shapes)",
            dora_ratios,
            LIMIT,
        ),
        geomean_target(
            "LoCon conv fwd+bwd: LoRAConv2d / peft Conv2d LoRA (geometric mean over shapes)",
            locon_ratios,
            LIMIT,
        ),
    ]
    floors = [geomean([c.median for c in controls]) for controls in (dora_controls, locon_controls)]
    notes = [
        (
            f"Rank {RANK}, fp32, frozen base with bias; forward + backward with a fixed output gradient; "
            f"each repeat times as many calls as fit in {settings.min_time:g} s; all variants of a shape "
            "alternate, order rotated per repeat. Ratios are per repeat (paired), then median and min–max."
        ),
        (
            "Ours and peft's are checked to give the same output (same factors; for DoRA the same magnitude, "
            f"moved off ||W||) within {TOLERANCE:g} before timing. The A/A control times a second, identical "
            "peft layer (peft DoRA for the linear table): its distance from 1 is the noise floor; its "
            f"geometric mean over shapes is {floors[0]:.3f}× (DoRA) and {floors[1]:.3f}× (LoCon)."
        ),
        (
            "Both DoRAs recompute ||W + s B A|| per output channel every call (detached, as in the DoRA "
            "paper): the DoRA / LoRA columns are that cost, largest where tokens are few against the "
            "weight's size. Ours forms B A as one matmul; peft (an FSDP workaround) runs a d x d identity "
            "through lora_A and lora_B, twice the FLOPs plus the identity and a transposed copy, hence ours' "
            "lead at 77 tokens."
        ),
        "Each target is judged as the plain layer's: the geometric mean of the per-shape median ratios.",
    ]
    return Section(
        "DoRA and LoCon layers, forward + backward (CPU)",
        [
            "input (batch, tokens, features)",
            "lora_nb LoRA",
            "lora_nb DoRA",
            "peft LoRA",
            "peft DoRA",
            "lora_nb DoRA / LoRA",
            "peft DoRA / LoRA",
            "DoRA: lora_nb / peft",
            "A/A control: peft DoRA copy / peft DoRA",
        ],
        dora,
        targets,
        notes,
        more_tables=[
            (
                "LoCon (LoRA on Conv2d):",
                [
                    "conv, input (batch, channels, H, W)",
                    "lora_nb LoRAConv2d",
                    "peft Conv2d LoRA",
                    "lora_nb / peft",
                    "A/A control: peft copy / peft",
                ],
                locon,
            )
        ],
    )

"""Inference with an adapter: the base pipeline, the adapter unfused, and the adapter fused into the weights.

1. The tiny pipeline end to end (``pipe(prompt, num_inference_steps=25)``, DPM-Solver++, guidance 7.5, PIL
   out): ``load_tiny_pipeline`` against ``load_lora_pipeline`` with a rank-4 adapter on the UNet's attention,
   unfused and then ``pipe.lora.fuse()``d.
2. An SD-1.5-shaped attention block: the ``Transformer2DModel`` of SD 1.5's first down block (320 channels,
   8 heads of 40, a 64x64 latent = 4096 tokens, 77 text tokens of width 768), random weights, batch 2 (one
   conditional and one unconditional, as under guidance), forward only.

Fused must cost what the base costs: fusing (``lora_nb.fuse_lora``, which ``pipe.lora.fuse()`` uses) folds the
update into the weights and puts the plain ``nn.Linear`` layers back, so a fused model is the base's module
tree with other numbers in it (checked here); any difference from the base is noise, read against the A/A
column.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from .common import Section, Settings, Stat, Target, interleave, paired_ratio, time_per_call

FUSED_LIMIT = 1.01
PROMPT = "a drawing of a green creature with red eyes"
STEPS = 25
RANK = 4


def randomise_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B factors, as after training (a fresh adapter's B = 0 would still run the same ops)."""
    from lora_nb.inject import lora_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.02)


def tiny_pipelines(model: Path, workdir: Path):
    from lora_nb import inject_lora, load_lora_pipeline, save_lora_weights
    from lora_nb.course.tiny import load_tiny_pipeline
    from lora_nb.inject import UNET_ATTENTION

    base = load_tiny_pipeline(model)
    donor = load_tiny_pipeline(model)
    torch.manual_seed(0)
    inject_lora(donor.unet, UNET_ATTENTION, rank=RANK)
    randomise_lora(donor.unet)
    save_lora_weights(workdir, unet=donor.unet)
    adapted = load_lora_pipeline(workdir, base_model=str(model))
    for pipe in (base, adapted):
        pipe.set_progress_bar_config(disable=True)
    return base, adapted


def run_pipe(pipe, output_type: str = "pil"):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=STEPS, generator=generator, output_type=output_type)


def row(workload: str, stats: dict[str, Stat]) -> list[str]:
    ratio = {
        name: paired_ratio(stats[name], stats["base"]).ratio() for name in ("unfused", "fused", "control")
    }
    return [
        workload,
        stats["base"].ms(),
        stats["unfused"].ms(),
        stats["fused"].ms(),
        ratio["unfused"],
        ratio["fused"],
        ratio["control"],
    ]


def fused_call(lora, call, warm_up):
    """Time ``call`` with the adapter fused; fusing, unfusing and one warm-up call stay outside the timing.

    The warm-up matters: the first call on freshly written weights pays one-off costs that the base, warm
    since its first repeat, does not.
    """

    def timed() -> float:
        lora.fuse()
        try:
            warm_up()
            return call()
        finally:
            lora.unfuse()

    return timed


def assert_base_tree(model: torch.nn.Module) -> None:
    from lora_nb.layers import LoRALinear

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise AssertionError("a fused model still holds LoRALinear wrappers")


def bench_tiny(settings: Settings) -> tuple[list[list[str]], list[Target], list[str]]:
    with tempfile.TemporaryDirectory(prefix="lora_nb-bench-") as tmp:
        base, adapted = tiny_pipelines(settings.model, Path(tmp))
    with torch.no_grad():
        unfused_latents = run_pipe(adapted, "latent").images
        adapted.lora.fuse()
        assert_base_tree(adapted.unet)
        fused_latents = run_pipe(adapted, "latent").images
        adapted.lora.unfuse()
        base_latents = run_pipe(base, "latent").images
    fuse_error = (fused_latents - unfused_latents).abs().max().item()
    adapter_effect = (base_latents - unfused_latents).abs().max().item()
    if fuse_error > 1e-3 or adapter_effect < 1e-3:
        raise AssertionError(f"fused vs unfused differ by {fuse_error}, base vs adapter by {adapter_effect}")

    fuse_times, unfuse_times = [], []
    for _ in range(settings.repeats):
        began = time.perf_counter()
        adapted.lora.fuse()
        fuse_times.append(time.perf_counter() - began)
        began = time.perf_counter()
        adapted.lora.unfuse()
        unfuse_times.append(time.perf_counter() - began)

    def call(pipe):
        return lambda: time_per_call(lambda: run_pipe(pipe), settings.min_time)

    from lora_nb.course.tiny import load_tiny_pipeline

    control = load_tiny_pipeline(settings.model)  # A/A: a second, identical base pipeline
    control.set_progress_bar_config(disable=True)
    fused_timing = fused_call(adapted.lora, call(adapted), lambda: run_pipe(adapted))
    stats = interleave(
        {"base": call(base), "unfused": call(adapted), "fused": fused_timing, "control": call(control)},
        settings.repeats,
    )
    rows = [row(f"tiny-sd pipeline, {STEPS} steps, 1 prompt (UNet batch 2)", stats)]
    fused = paired_ratio(stats["fused"], stats["base"])
    targets = [fused.target("inference, tiny pipeline: fused / base", FUSED_LIMIT)]
    notes = [
        (
            f"tiny pipeline: fuse() {Stat(fuse_times).ms()}, unfuse() {Stat(unfuse_times).ms()} (not in the "
            f"timings); fused and unfused give the same latents (max difference {fuse_error:.1e})."
        )
    ]

    if fused.median > FUSED_LIMIT:
        notes.append(
            "MISS explained: fused, the pipeline runs exactly the base's module tree and kernels (checked "
            "above); what is left is noise: compare the A/A column."
        )
    return rows, targets, notes


def sd15_attention_block():
    """SD 1.5's first down block's Transformer2DModel: 320 channels, 8 heads x 40, cross-attention 768."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    return Transformer2DModel(
        num_attention_heads=8,
        attention_head_dim=40,
        in_channels=320,
        num_layers=1,
        cross_attention_dim=768,
        norm_num_groups=32,
        use_linear_projection=False,
    ).eval()


def bench_sd15_block(settings: Settings) -> tuple[list[list[str]], list[Target], list[str]]:
    from lora_nb.inject import UNET_ATTENTION, fuse_lora, inject_lora, unfuse_lora

    base = sd15_attention_block().requires_grad_(False)
    adapted = copy.deepcopy(base)
    inject_lora(adapted, UNET_ATTENTION, rank=RANK)
    randomise_lora(adapted)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 320, 64, 64, generator=generator)
    text = torch.randn(2, 77, 768, generator=generator)

    def forward(block):
        with torch.no_grad():
            block(hidden, encoder_hidden_states=text)

    def call(block):
        forward(block)  # warm-up
        calls = 1 if settings.quick else 3
        return lambda: time_per_call(lambda: forward(block), settings.min_time, min_calls=calls)

    class Fused:
        def fuse(self):
            self.wrappers = fuse_lora(adapted)
            assert_base_tree(adapted)

        def unfuse(self):
            unfuse_lora(adapted, self.wrappers)

    fused_timing = fused_call(Fused(), call(adapted), lambda: forward(adapted))
    stats = interleave(
        {
            "base": call(base),
            "unfused": call(adapted),
            "fused": fused_timing,
            "control": call(copy.deepcopy(base)),
        },
        settings.repeats,
    )
    rows = [row("SD-1.5 attention block (320 ch, 4096 tokens, batch 2), forward", stats)]
    fused = paired_ratio(stats["fused"], stats["base"])
    targets = [fused.target("inference, SD-1.5 attention block: fused / base", FUSED_LIMIT)]
    notes = []
    if fused.median > FUSED_LIMIT:
        notes.append(
            "MISS in the SD-1.5 block: fused, it is the base's module tree (checked) and runs the base's "
            "kernels on other numbers; the difference is noise: compare the A/A column."
        )
    return rows, targets, notes


def benchmark(settings: Settings, sd15_block: bool = True) -> Section:
    rows, targets, notes = bench_tiny(settings)
    if sd15_block:
        more = bench_sd15_block(settings)
        rows += more[0]
        targets += more[1]
        notes += more[2]
    notes.append(
        f"Adapter: rank {RANK} on to_q, to_k, to_v, to_out.0 with non-zero factors. Each repeat times as "
        f"many calls as fit in {settings.min_time:g} s; variants alternate, order rotated per repeat."
    )
    notes.append(
        "The A/A control times a second, identical copy of the base like any other variant: its distance "
        "from 1 is this machine's noise floor, against which a 1% limit has to be read."
    )
    return Section(
        "Inference: base, adapter unfused, adapter fused (CPU)",
        [
            "workload",
            "base",
            "unfused",
            "fused",
            "unfused / base",
            "fused / base",
            "A/A control: identical base / base",
        ],
        rows,
        targets,
        notes,
    )

"""What several notebooks do alike: pick the device and dtype to draw on, score a subject fine-tune, and
measure a run's checkpoints.

The device and dtype follow the trainer's own reading of ``mixed_precision``; the scores are notebook 4's
fidelity, leakage and drift (``lora_nb.course.evaluate``'s measures) and its count of the seeds that drew
the course's subject, which notebook 6 reports too:

    device, dtype = device_and_dtype(mixed_precision)
    pipe = load_base_pipeline(base_model, dtype=dtype, device=device)

    samples = {"base": (base_subject, base_class), "LoRA": (subject, klass)}
    print(subject_table(subject_measures(samples, instance_images)))
    counts = subject_counts(samples)  # {"LoRA": (seeds that drew the subject, seeds that drew a plain star)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import torch

from ..checkpoints import checkpoint_dirs
from ..config import TrainConfig, check_value
from ..formats import load_lora_weights, read_lora
from ..inference import sample_images
from ..inject import remove_lora
from ..train import precision_dtype, training_precision
from .evaluate import HeldOut, pixel_drift, shows_plain, shows_subject, subject_distance

MEASURES = {  # name: what its value means, as the table's header says it
    "fidelity": "lower: like the subject",
    "leakage": "higher: class kept",
    "drift": "lower: kept",
}
_MIXED_PRECISION = next(f for f in fields(TrainConfig) if f.name == "mixed_precision")


def device_and_dtype(mixed_precision: str | None = "no") -> tuple[str, torch.dtype]:
    """The device a notebook draws on and the dtype of its pipelines, for the trainer's ``mixed_precision``.

    The device is "cuda" when there is one, else "cpu" (the notebooks draw on the CPU even where the trainer
    would use MPS). The precision is read by the trainer's own rule, ``lora_nb.train.training_precision``:
    "auto" is bf16 on GPUs that compute in it, fp16 on older ones and fp32 on a CPU; "fp16" on a CPU is fp32
    (with the trainer's warning); "bf16" stays bf16 everywhere; "no" (or None) is fp32.
    """
    check_value(_MIXED_PRECISION, mixed_precision)  # the trainer's choices, and its error message
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = TrainConfig(pretrained_model_name_or_path="", mixed_precision=mixed_precision)
    precision = training_precision(config, cpu=device == "cpu")
    return device, precision_dtype(precision)


def subject_measures(
    samples: Mapping[str, tuple[Sequence, Sequence]], instance_images: Sequence, baseline: str = "base"
) -> dict[str, dict[str, float]]:
    """Fidelity, leakage and drift of each model in ``samples``: {name: (its images of the subject prompt,
    its images of the plain class prompt)}, every model drawn with the same seeds, the base model under
    ``baseline``. Per model, {measure: value}:

    - fidelity: ``subject_distance`` of the subject prompt's images to ``instance_images`` (0 = the same
      foreground colours, 1 = none in common). Lower: more like the subject.
    - leakage: the same distance for the class prompt's images. Higher: the class kept its meaning.
    - drift: ``pixel_drift`` of the class prompt's images from the base model's (0-1; 0 for the base
      itself). Lower: the prior kept.
    """
    if baseline not in samples:
        raise ValueError(f"no {baseline!r} in samples ({list(samples)}): drift is measured from it")
    base_class = samples[baseline][1]
    return {
        name: {
            "fidelity": subject_distance(subject, instance_images),
            "leakage": subject_distance(klass, instance_images),
            "drift": pixel_drift(klass, base_class),
        }
        for name, (subject, klass) in samples.items()
    }


def subject_counts(samples: Mapping[str, tuple[Sequence, Sequence]]) -> dict[str, tuple[int, int]]:
    """Per model in ``samples`` ({name: (subject prompt's images, class prompt's images)}): how many of the
    subject prompt's images show the course's subject (``shows_subject``) and how many of the class prompt's
    show a plain star (``shows_plain``)."""
    return {
        name: (sum(map(shows_subject, subject)), sum(map(shows_plain, klass)))
        for name, (subject, klass) in samples.items()
    }


def subject_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """``subject_measures``' rows as text: one line per model, each measure with what its direction means."""
    width = max(len("model"), *(len(name) for name in rows))
    headers = [f"{name} ({meaning})" for name, meaning in MEASURES.items()]
    lines = [" | ".join([f"{'model':>{width}}", *headers])]
    for name, row in rows.items():
        values = [
            f"{row[measure]:{len(header)}.3f}" for measure, header in zip(MEASURES, headers, strict=True)
        ]
        lines.append(" | ".join([f"{name:>{width}}", *values]))
    return "\n".join(lines)


def measure_checkpoints(
    pipe,
    output_dir: str | Path,
    held_out: Sequence[HeldOut],
    prompts: Sequence[str],
    final_step: int | None = None,
    seed: int = 0,
    **call,
) -> list[dict]:
    """Every checkpoint of a training run (``output_dir/checkpoint-N``, oldest first), and with
    ``final_step`` the run's final adapter (``output_dir`` itself: the trainer writes no checkpoint at the
    last step), put on ``pipe`` in turn and measured, then taken off again: {"step", "losses": [each
    HeldOut's loss], "images": one per prompt, prompt i from seed + i}. ``call`` goes to the pipeline."""
    folders = {int(folder.name.split("-")[1]): folder for folder in checkpoint_dirs(Path(output_dir))}
    if final_step is not None:
        folders[final_step] = Path(output_dir)
    if not folders:
        raise FileNotFoundError(f"no checkpoint-N folder in {output_dir}: train with checkpointing_steps > 0")
    rows = []
    for step, folder in sorted(folders.items()):
        adapter = read_lora(folder)
        has_text = any(key.startswith("text_encoder.") for key in adapter.tensors)
        load_lora_weights(adapter, unet=pipe.unet, text_encoder=pipe.text_encoder if has_text else None)
        try:
            losses = [h.loss(pipe) for h in held_out]
            rows.append(
                {
                    "step": step,
                    "losses": losses,
                    "images": sample_images(pipe, list(prompts), seed=seed, **call),
                }
            )
        finally:
            remove_lora(pipe.unet)
            remove_lora(pipe.text_encoder)
    return rows

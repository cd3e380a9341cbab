"""What several notebooks do alike: pick the device and dtype to draw on, and score a subject fine-tune.

The device and dtype follow the trainer's own reading of ``mixed_precision``; the scores are notebook 4's
fidelity, leakage and drift (``lora_nb.course.evaluate``'s measures), which notebook 6 reports too:

    device, dtype = device_and_dtype(mixed_precision)
    pipe = load_base_pipeline(base_model, dtype=dtype, device=device)

    rows = subject_measures({"base": (base_subject, base_class), "LoRA": (subject, klass)}, instance_images)
    print(subject_table(rows))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields

import torch

from ..config import TrainConfig, check_value
from ..train import precision_dtype, training_precision
from .evaluate import pixel_drift, subject_distance

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

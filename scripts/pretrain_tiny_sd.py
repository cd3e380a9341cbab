"""Pretrain the embedded tiny Stable Diffusion on the 64 px parts world (`lora_nb.course.world`), export it.

    python scripts/pretrain_tiny_sd.py --work pretrain-work            # resumes from pretrain-work/ if there
    python scripts/pretrain_tiny_sd.py --work pretrain-work --export-only
    python scripts/pretrain_tiny_sd.py --work fresh-work --init-from data/tiny-sd   # continue from an export

Two stages, as Stable Diffusion was made: first the VAE learns to compress 64x64 images to 4x16x16
latents (on parts, creatures and the subject, since it stays frozen in every later fine-tune); then the
UNet and the text encoder learn together to denoise latents of captioned parts images. Creatures and the
subject never reach stage two: they are what the course's LoRAs teach. Checkpoints (tensors and plain
values only, loaded with `weights_only=True`) are written atomically every `--checkpoint-every` steps, so
the run can be stopped and resumed at any time; the exported pipeline uses the EMA of the weights.
A larger `--vae-steps` continues the VAE stage: its encoder changes, so the decoder stage starts again on the
new latents, the pool is encoded again, and the UNet stage goes on with them (its average restarting).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard

from lora_nb.course.tiny import TINY_SD_PATH, build_untrained_pipeline
from lora_nb.course.world import (
    PRETRAINING_FIRST_SEED,
    draw_creature_sample,
    draw_parts_sample,
    draw_subject_sample,
    parts_caption,
)
from lora_nb.data import tokenize
from lora_nb.objective import denoising_loss

VAE_FIRST_SEED = 2_000_000


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (batch, 3, h, w) in [-1, 1], as the VAE takes them."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def vae_batch(step: int, batch_size: int) -> torch.Tensor:
    rng = random.Random(VAE_FIRST_SEED + step)
    draws = rng.choices(
        [draw_parts_sample, draw_creature_sample, draw_subject_sample], [6, 3, 1], k=batch_size
    )
    return to_tensor([draw(rng.randrange(10**9)).image for draw in draws])


def save_atomically(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    # tensors and plain values only: no code from a file; onto the CPU, whichever device wrote it
    return torch.load(path, weights_only=True, map_location="cpu")


def machine(device: str) -> str:
    """The name the model card gives the machine a stage ran on: a GPU's own name, else "CPU", "MPS", ..."""
    kind = torch.device(device).type
    return torch.cuda.get_device_name(device) if kind == "cuda" else kind.upper()


def machines_so_far(state: dict | None, device: str) -> list[str]:
    """The machines a stage has run on, this one included (a checkpoint from before they were recorded: a
    CPU, as every run then was)."""
    earlier = [] if state is None else state.get("machines", ["CPU"])
    return sorted({*earlier, machine(device)})


def resume_vae_stage(state: dict | None, vae, optimizer, device: str) -> tuple[int, list[str]]:
    """Load a VAE stage's checkpoint `state` (the optimiser too, unless it was seeded from an export by
    --init-from) and return its step (0 without one) and the machines the stage will have run on."""
    if state is None:
        return 0, machines_so_far(None, device)
    vae.load_state_dict(state["vae"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    return state["step"], machines_so_far(state, device)


def save_vae_stage(ckpt: Path, vae, optimizer, step: int, machines: list[str]) -> None:
    state = {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "machines": machines}
    save_atomically(state, ckpt)


def vae_step(work: Path) -> int:
    """The VAE stage's step: which encoder, so which latents, everything after it was made with."""
    return load_checkpoint(work / "vae.pt")["step"]


def fitted_decoder(work: Path, vae_state: dict) -> dict | None:
    """The decoder stage's checkpoint, if it was fitted to the encoder of `vae_state` (the VAE stage's): None
    when there is none, or when the VAE stage has gone on since (its encoder changed, so the latents the
    decoder knows). The decoder stage never trains the encoder, so the two checkpoints' encoders are equal
    exactly when the decoder belongs to this one."""
    path = work / "decoder.pt"
    if not path.exists():
        return None
    state, encoder = load_checkpoint(path), vae_state["vae"]
    same = all(torch.equal(state["vae"][k], v) for k, v in encoder.items() if k.startswith("encoder."))
    return state if same else None


def set_cosine_lr(optimizer, peak: float, step: int, steps: int) -> None:
    """Cosine from ``peak`` down to a tenth of it: the last steps sharpen the edges."""
    for group in optimizer.param_groups:
        group["lr"] = peak * (0.55 + 0.45 * math.cos(math.pi * step / steps))


def set_denoiser_lr(optimizer, args, step: int) -> None:
    """Warm up to ``--lr``, hold it, and from ``--cooldown-from`` (if given) follow a cosine down to a tenth
    of it at ``--steps``: a constant rate keeps the weights moving, so the last steps settle them."""
    if args.cooldown_from is not None and step >= args.cooldown_from:
        cooldown = max(1, args.steps - args.cooldown_from)
        set_cosine_lr(optimizer, args.lr, step - args.cooldown_from, cooldown)
    else:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def train_vae(pipe, work: Path, args) -> None:
    ckpt = work / "vae.pt"
    vae = pipe.vae
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    state = load_checkpoint(ckpt) if ckpt.exists() else None
    step, machines = resume_vae_stage(state, vae, optimizer, args.device)
    if step == 0:
        # Start from a near-deterministic posterior (std e^-4): at logvar 0 the sampled latents are so noisy
        # that the decoder learns to paint every body the data set's mean brown. The KL term's weight is
        # tiny, as in SD's VAE, so the encoder keeps the latitude it needs.
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :].fill_(-8.0)
    vae.train()
    start = time.time()
    while step < args.vae_steps:
        set_cosine_lr(optimizer, args.vae_lr, step, args.vae_steps)
        images = vae_batch(step, args.vae_batch_size).to(args.device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, images)
        loss = mse + F.l1_loss(reconstruction, images) + args.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0:
            print(
                f"vae step {step} mse {mse.item():.5f} ({(time.time() - start) / 50:.2f} s/step)", flush=True
            )
            start = time.time()
        if step % args.checkpoint_every == 0 or step == args.vae_steps:
            save_vae_stage(ckpt, vae, optimizer, step, machines)
    vae.eval().requires_grad_(False)


POSTERIOR_LOGVAR = -12.0  # std e^-6: a sampled latent is its mean to 0.25 % of the latents' spread


@torch.no_grad()
def make_posterior_deterministic(vae) -> None:
    """Give every latent the same tiny posterior variance; the means, so the latents, stay as they are.

    The encoder learned large variances (std up to 1) where the decoder ignores a latent, as a VAE's KL term
    allows. The UNet learns from the means, but fine-tuning (diffusers' scripts, lora_nb's trainer)
    samples the posterior, and those samples are noise the UNet never saw: a LoRA then fits that noise
    and draws worse. SD 1.5's VAE has variances this small everywhere.
    """
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:].zero_()
    vae.quant_conv.bias[channels:].fill_(POSTERIOR_LOGVAR)


def detail_weights(images: torch.Tensor) -> torch.Tensor:
    """(batch, 1, h, w) loss weights, up to 9 where the image changes within 3x3 pixels: a pupil, a dot or
    a stripe is a few pixels, and a plain pixel loss spends the decoder on the flat paper instead."""
    local_range = F.max_pool2d(images, 3, 1, 1) + F.max_pool2d(-images, 3, 1, 1)  # max - min, up to 2
    return 1 + 4 * local_range.amax(1, keepdim=True)


def train_decoder(pipe, work: Path, args) -> None:
    """Fine-tune the VAE's decoder alone, as SD's ft-MSE VAE decoders were made: the encoder, and so the
    latents the UNet learns from, stay as they are, so this stage can run before, beside or after the
    UNet's."""
    ckpt, vae, vae_state = work / "decoder.pt", pipe.vae, load_checkpoint(work / "vae.pt")
    first_draw = vae_state["step"]
    vae.load_state_dict(vae_state["vae"])
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    fitted = fitted_decoder(work, vae_state)
    if fitted is None and ckpt.exists():
        print(f"the VAE stage went on to step {first_draw}: the decoder stage starts again", flush=True)
    step, machines = resume_vae_stage(fitted, vae, optimizer, args.device)
    make_posterior_deterministic(vae)  # not trained here: the decoder learns from the means
    vae.requires_grad_(False).eval()
    for p in params:
        p.requires_grad_(True)
    start = time.time()
    while step < args.decoder_steps:
        set_cosine_lr(optimizer, args.decoder_lr, step, args.decoder_steps)
        images = vae_batch(first_draw + step, args.vae_batch_size)  # draws the VAE stage never saw
        images = images.to(args.device)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
        error = vae.decode(latents).sample - images
        weights = detail_weights(images)
        loss = (weights * (error.square() + error.abs())).mean() / weights.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0:
            mse = error.square().mean().item()
            print(f"decoder step {step} mse {mse:.5f} ({(time.time() - start) / 50:.2f} s/step)", flush=True)
            start = time.time()
        if step % args.checkpoint_every == 0 or step == args.decoder_steps:
            save_vae_stage(ckpt, vae, optimizer, step, machines)
    vae.requires_grad_(False)


@torch.no_grad()
def encode_pool(pipe, size: int, batch_size: int = 256) -> tuple[torch.Tensor, list[dict], float]:
    """Latent means of `size` parts images, their attributes, and the scaling factor giving unit variance."""
    attributes, latents = [], []
    for first in range(0, size, batch_size):
        samples = [
            draw_parts_sample(PRETRAINING_FIRST_SEED + i) for i in range(first, min(size, first + batch_size))
        ]
        print(f"encoding the pool: {first + len(samples)}/{size}", flush=True)
        attributes += [s.attributes for s in samples]
        images = to_tensor([s.image for s in samples]).to(pipe.device)
        latents.append(pipe.vae.encode(images).latent_dist.mean.cpu())
    latents = torch.cat(latents)
    return latents, attributes, float(1.0 / latents.std())


# How the UNet stage trained before checkpoints recorded it (the first 10 750 steps of the shipped model); a
# checkpoint's "objectives" lists each change since (target, loss weighting, noise, learning rate), from the
# step it took effect.
FIRST_OBJECTIVE = {"from_step": 0, "prediction_type": "epsilon", "snr_gamma": 5.0, "multires_discount": 0.0}
# What an entry recorded before these keys existed trained with: the shipped model's first 25 000 steps, on
# the latents of the VAE stage's step 4000.
EARLIER_DEFAULTS = {"lr": 1e-3, "cooldown_from": None, "vae_step": 4000}


def with_earlier_defaults(entry: dict) -> dict:
    return {**EARLIER_DEFAULTS, **entry}


def describe_objectives(history: list[dict], steps: int) -> str:
    """'steps 0-10750: epsilon target, Min-SNR 5, Gaussian noise, lr 0.001; ...' for the model card."""
    history = list(map(with_earlier_defaults, history))
    ends = [h["from_step"] for h in history[1:]] + [steps]
    latents_changed = [False] + [a["vae_step"] != b["vae_step"] for a, b in itertools.pairwise(history)]
    return "; ".join(
        f"steps {h['from_step']}-{end}: {h['prediction_type'].replace('_', '-')} target, "
        + (f"Min-SNR {h['snr_gamma']:g}" if h["snr_gamma"] else "unweighted loss")
        + ", "
        + (f"multires noise {h['multires_discount']:g}" if h["multires_discount"] else "Gaussian noise")
        + f", lr {h['lr']:g}"
        + (
            f" (from step {h['cooldown_from']} a cosine down to a tenth)"
            if h["cooldown_from"] is not None
            else ""
        )
        + (f", on the latents of the VAE at step {h['vae_step']}" if changed else "")
        for h, end, changed in zip(history, ends, latents_changed, strict=True)
    )


def resume_denoiser(ckpt: Path, modules: dict, device: str) -> tuple[int, list[dict], list[str]]:
    """Load the UNet stage's checkpoint, if there is one, into `modules`; return its step, its objectives
    (none before the first step) and the machines it will have run on."""
    if not ckpt.exists():
        return 0, [], machines_so_far(None, device)
    state = load_checkpoint(ckpt)
    for key, module in modules.items():
        if key in state:  # an export (--init-from) has the weights, not the optimizer's moments
            module.load_state_dict(state[key])
    return state["step"], state.get("objectives", [FIRST_OBJECTIVE]), machines_so_far(state, device)


def restarts_average(before: dict, after: dict) -> bool:
    """Whether the EMA starts again between two objectives: an average of weights trained for two targets, or
    on two VAEs' latents, predicts neither."""
    before, after = with_earlier_defaults(before), with_earlier_defaults(after)
    return any(before[key] != after[key] for key in ("prediction_type", "vae_step"))


def adopt_objective(history: list[dict], objective: dict, step: int, averages: list[tuple]) -> list[dict]:
    """The objectives with `objective` from `step` on, where it is new. Where the average restarts, each EMA
    copy in `averages` ((ema, model) pairs) starts again from its model."""
    if (
        history
        and {k: v for k, v in with_earlier_defaults(history[-1]).items() if k != "from_step"} == objective
    ):
        return history
    print(f"step {step}: the objective is now {objective}", flush=True)
    if history and restarts_average(history[-1], objective):
        for ema, model in averages:
            ema.load_state_dict(model.state_dict())
    return [*history, {"from_step": step, **objective}]


def ema_start(history: list[dict]) -> int:
    """The step the EMA last started from: where the prediction target or the latents last changed."""
    changes = [b["from_step"] for a, b in itertools.pairwise(history) if restarts_average(a, b)]
    return changes[-1] if changes else 0


def load_pool(pipe, work: Path, args, encoder_step: int) -> tuple[torch.Tensor, list[dict]]:
    """The pool's latents, scaled to unit variance and on `args.device`, and their attributes: encoded into
    `work` by `pipe`'s VAE (the VAE stage's at `encoder_step`), and again (as many images) whenever the VAE
    stage has gone on since. The VAE's config takes the pool's scaling factor."""
    pool_path, attributes_path = work / "pool.pt", work / "pool-attributes.json"
    pool = load_checkpoint(pool_path) if pool_path.exists() else None
    if pool is None or pool.get("vae_step", EARLIER_DEFAULTS["vae_step"]) != encoder_step:
        size = args.pool_size if pool is None else len(pool["latents"])
        latents, attributes, scaling = encode_pool(pipe, size)
        attributes_path.write_text(json.dumps(attributes))
        pool = {"latents": latents, "scaling": scaling, "vae_step": encoder_step}
        save_atomically(pool, pool_path)
    pipe.vae.register_to_config(scaling_factor=pool["scaling"])
    return pool["latents"].to(args.device) * pool["scaling"], json.loads(attributes_path.read_text())


def train_denoiser(pipe, work: Path, args) -> None:
    ckpt, encoder_step = work / "denoiser.pt", vae_step(work)
    latents, attributes = load_pool(pipe, work, args, encoder_step)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema_unet, ema_text = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    step, history, machines = resume_denoiser(ckpt, {**modules, "optimizer": optimizer}, args.device)
    objective = {
        "prediction_type": pipe.scheduler.config.prediction_type,
        "snr_gamma": args.snr_gamma,
        "multires_discount": args.multires_discount,
        "lr": args.lr,
        "cooldown_from": args.cooldown_from,
        "vae_step": encoder_step,
    }
    history = adopt_objective(history, objective, step, [(ema_unet, unet), (ema_text, text_encoder)])
    averaged_from = ema_start(history)
    unet.train()
    text_encoder.train()
    losses, start = [], time.time()
    generator = torch.Generator(args.device)
    while step < args.steps:
        # Each step's draws depend on the step alone: a resumed run needs no random state from its checkpoint.
        rng, generator = random.Random(step), generator.manual_seed(step)
        index = torch.randint(0, len(latents), (args.batch_size,), generator=generator, device=args.device)
        captions = ["" if rng.random() < 0.1 else parts_caption(attributes[i], rng) for i in index.tolist()]
        ids = tokenize(tokenizer, captions).to(args.device)
        set_denoiser_lr(optimizer, args, step)
        loss = denoising_loss(
            unet,
            pipe.scheduler,
            latents[index],
            text_encoder(ids)[0],
            snr_gamma=args.snr_gamma,
            multires_discount=args.multires_discount,
            generator=generator,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step - averaged_from) / (10 + step - averaged_from))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(
                f"unet step {step} loss {np.mean(losses):.4f} ({(time.time() - start) / 50:.2f} s/step)",
                flush=True,
            )
            losses, start = [], time.time()
        if step % args.checkpoint_every == 0 or step == args.steps:
            weights = {key: module.state_dict() for key, module in modules.items()}
            state = {
                "optimizer": optimizer.state_dict(),
                "step": step,
                "objectives": history,
                "machines": machines,
            }
            save_atomically({**weights, **state}, ckpt)


CARD = """\
# tiny-sd: the lora_nb course's embedded Stable Diffusion

A {params:.1f} M-parameter model with Stable Diffusion 1.5's architecture and module names, made so the
course runs offline on a CPU in seconds. It was trained on {size}x{size} px pictures of the parts of a
small visual world, captioned in plain descriptive words: bodies (circle, square, triangle, star) in six
colours (red, green, blue, yellow, purple, orange) and three sizes, thin or thick outlines of a named
colour, a dot, two dots or stripes inside, pointy or round ears, antennae or horns, one or two objects on
the left / right / top / bottom, on white, black, gray or pastel (pink, cream, mint, sky) paper — for
instance "a large red circle with a thick black outline and two yellow dots on the left on a pink
background". Which of these it follows when prompted, and how well, is measured below ("Measured").

| part | class | parameters |
| --- | --- | --- |
| UNet | `UNet2DConditionModel`, blocks {unet_blocks}, cross-attention width {cross} | {unet:,} |
| VAE | `AutoencoderKL`, blocks {vae_blocks}, 4 latent channels, latent = image / 4 | {vae:,} |
| text encoder | `CLIPTextModel`, {layers} layers, width {cross} | {text:,} |
| tokenizer | `CLIPTokenizer`, byte-level BPE with one token per caption word, {vocab} tokens | |

How it was made: `python scripts/pretrain_tiny_sd.py` (from the lora_nb repository) trained the VAE for
{vae_steps} steps on parts, creatures and the DreamBooth subject (then its decoder alone for
{decoder_steps} more, small parts weighted up, as SD's ft-MSE decoders were made: the latents stay the
same), then the UNet and the text encoder together for {steps} steps (batch {batch}, AdamW, 10% empty
captions for classifier-free guidance, EMA {ema}) on a pool of {pool} captioned parts images
({objectives}); this export uses the EMA weights. Where each stage ran: {machines}.
The UNet predicts the velocity v, as SD 2.x's does (SD 1.5's predicts the noise): the first 10 750 steps
predicted the noise, and that model drew every object where the starting noise put it, whatever position
word the prompt had (`lora_nb/course/tiny.py` says why); multi-resolution noise hides the trace of the
layout that SD's schedule leaves at its noisiest step. It has never seen the creatures' composition or
caption language ("a drawing of a blue creature with red eyes and round ears") nor the DreamBooth subject
(an orange star with a purple dot): those are what the course's LoRAs teach.
"""


def load_final_vae(pipe, work: Path) -> dict[str, dict]:
    """Put the VAE as it ships into `pipe` (its decoder fine-tuned where that stage has a checkpoint fitted to
    the current encoder) and return the checkpoint of each VAE stage it comes from, for the model card."""
    states = {"vae": load_checkpoint(work / "vae.pt")}
    decoder = fitted_decoder(work, states["vae"])
    if decoder is not None:
        states["decoder"] = decoder
    pipe.vae.load_state_dict((decoder or states["vae"])["vae"])
    make_posterior_deterministic(pipe.vae)
    return states


def stage_steps(states: dict[str, dict]) -> dict[str, int]:
    return {stage: state["step"] for stage, state in states.items()}


def stage_machines(states: dict[str, dict]) -> dict[str, list[str]]:
    """The machines each stage ran on, from its checkpoint (before they were recorded: a CPU)."""
    return {stage: state.get("machines", ["CPU"]) for stage, state in states.items()}


def describe_machines(machines: dict[str, list[str]]) -> str:
    """For the card: 'the VAE on CPU; its decoder on CPU; the UNet and the text encoder on CPU, ...'."""
    names = {"vae": "the VAE", "decoder": "its decoder", "unet": "the UNet and the text encoder"}
    return "; ".join(f"{names[stage]} on {', '.join(ran_on)}" for stage, ran_on in machines.items())


def export(pipe, work: Path, out: Path, args) -> None:
    pipe.to("cpu")  # saved from the CPU, whichever device trained it
    state = load_checkpoint(work / "denoiser.pt")
    vae_states = load_final_vae(pipe, work)
    learned_from = with_earlier_defaults(state.get("objectives", [FIRST_OBJECTIVE])[-1])["vae_step"]
    if learned_from != vae_states["vae"]["step"]:
        raise SystemExit(
            f"the UNet (step {state['step']}) has learned the latents of the VAE at step {learned_from}, "
            f"but the VAE stage is at step {vae_states['vae']['step']}: continue the UNet stage on its "
            f"latents first (--steps above {state['step']})"
        )
    pipe.unet.load_state_dict(state["ema_unet"])
    pipe.text_encoder.load_state_dict(state["ema_text"])
    vae_steps, machines = stage_steps(vae_states), stage_machines({**vae_states, "unet": state})
    pool = load_checkpoint(work / "pool.pt")
    pipe.vae.register_to_config(scaling_factor=pool["scaling"])
    tmp = out.with_name(out.name + ".tmp")
    # Tokenising in training left its padding and truncation on the tokenizer, which would be saved with it.
    pipe.tokenizer.backend_tokenizer.no_padding()
    pipe.tokenizer.backend_tokenizer.no_truncation()
    pipe.save_pretrained(tmp)
    count = lambda m: sum(p.numel() for p in m.parameters())
    card = ModelCard(
        CARD.format(
            params=(count(pipe.unet) + count(pipe.vae) + count(pipe.text_encoder)) / 1e6,
            size=pipe.vae.config.sample_size,
            unet_blocks=tuple(pipe.unet.config.block_out_channels),
            vae_blocks=tuple(pipe.vae.config.block_out_channels),
            cross=pipe.unet.config.cross_attention_dim,
            layers=pipe.text_encoder.config.num_hidden_layers,
            unet=count(pipe.unet),
            vae=count(pipe.vae),
            text=count(pipe.text_encoder),
            vocab=len(pipe.tokenizer),
            vae_steps=vae_steps["vae"],
            decoder_steps=vae_steps.get("decoder", 0),
            steps=state["step"],
            batch=args.batch_size,
            objectives=describe_objectives(state.get("objectives", [FIRST_OBJECTIVE]), state["step"]),
            ema=args.ema_decay,
            pool=len(pool["latents"]),
            machines=describe_machines(machines),
        )
    )
    card.data.library_name = "diffusers"
    card.data.pretrain_steps = {**vae_steps, "unet": state["step"]}  # read back by --init-from
    card.data.pretrain_machines = machines  # and this
    card.data.pretrain_objectives = state.get("objectives", [FIRST_OBJECTIVE])
    card.data.tags = ["stable-diffusion", "text-to-image", "tiny", "lora_nb"]
    card.save(tmp / "README.md")
    swap_into(tmp, out)
    print(f"exported step {state['step']} to {out}")


def swap_into(tmp: Path, out: Path) -> None:
    """Replace folder `out` by `tmp` so that a reader never sees a half-written export."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def export_vae(pipe, work: Path, out: Path) -> None:
    """Export the VAE alone (before the UNet stage has a checkpoint), so --init-from can continue it."""
    pipe.to("cpu")
    states = load_final_vae(pipe, work)
    steps = stage_steps(states)
    tmp = out.with_name(out.name + ".tmp")
    pipe.vae.save_pretrained(tmp / "vae")
    card = ModelCard(f"# tiny-sd in pretraining: the VAE after {steps} steps (no UNet yet)\n")
    card.data.pretrain_steps = steps
    card.data.pretrain_machines = stage_machines(states)
    card.save(tmp / "README.md")
    swap_into(tmp, out)
    print(f"exported the VAE at steps {steps} to {out}")


def seed_from_export(export: Path, work: Path) -> None:
    """Make `work`'s checkpoints from an exported pipeline, to continue pretraining on a machine without them.

    The export holds the EMA weights; they become both the weights and their average. The optimiser's
    moments are not exported, so AdamW starts afresh (after its warm-up, as at the start).
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    card = ModelCard.load(export / "README.md").data
    steps = card.get("pretrain_steps")
    if not steps:
        raise ValueError(f"{export}/README.md records no pretrain_steps: not an export of this script")
    machines = {stage: ["CPU"] for stage in steps} | dict(card.get("pretrain_machines") or {})
    vae = AutoencoderKL.from_pretrained(export / "vae").state_dict()
    seeded_vae = {"vae": vae, "step": steps["vae"], "machines": machines["vae"]}
    save_atomically(seeded_vae, work / "vae.pt")  # the encoder is what matters here
    if "decoder" in steps:
        decoder = {**seeded_vae, "step": steps["decoder"], "machines": machines["decoder"]}
        save_atomically(decoder, work / "decoder.pt")
    if "unet" not in steps:  # a VAE-only export (export_vae): the UNet stage starts from scratch
        print(f"seeded {work} from {export}: VAE step {steps['vae']}")
        return
    exported = StableDiffusionPipeline.from_pretrained(export)
    unet, text = exported.unet.state_dict(), exported.text_encoder.state_dict()
    save_atomically(
        {
            "unet": unet,
            "text_encoder": text,
            "ema_unet": unet,
            "ema_text": text,
            "step": steps["unet"],
            "objectives": card.get("pretrain_objectives", [FIRST_OBJECTIVE]),
            "machines": machines["unet"],
        },
        work / "denoiser.pt",
    )
    print(f"seeded {work} from {export}: VAE step {steps['vae']}, UNet step {steps['unet']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("pretrain-work"))
    parser.add_argument("--out", type=Path, default=TINY_SD_PATH)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=4e-4)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--decoder-steps", type=int, default=2000)
    parser.add_argument("--decoder-lr", type=float, default=1e-4)
    parser.add_argument(
        "--decoder-only", action="store_true", help="run the decoder stage alone (beside the UNet's is fine)"
    )
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--cooldown-from",
        type=int,
        help="UNet step from which the learning rate follows a cosine down to a tenth of --lr at --steps",
    )
    parser.add_argument(
        "--snr-gamma",
        type=float,
        help="Min-SNR gamma (off by default: it scales down the high-noise steps, where the layout is set)",
    )
    parser.add_argument(
        "--multires-discount",
        type=float,
        default=0.8,
        help="multi-resolution noise discount (0: plain Gaussian noise)",
    )
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--pool-size", type=int, default=40_000)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--export-only", action="store_true", help="export the last checkpoint and stop")
    parser.add_argument(
        "--init-from", type=Path, help="an export to continue from when --work holds no checkpoints"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (one runs best beside other work on 2 cores)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to train: cpu, cuda, cuda:1, ... (default: a GPU if there is one); the card says which",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    args.work.mkdir(parents=True, exist_ok=True)
    if args.init_from and not (args.work / "vae.pt").exists():
        seed_from_export(args.init_from, args.work)
    pipe = build_untrained_pipeline(seed=0).to(args.device)
    if args.decoder_only:
        return train_decoder(pipe, args.work, args)
    if not args.export_only:
        train_vae(pipe, args.work, args)
        train_denoiser(pipe, args.work, args)
        train_decoder(pipe, args.work, args)
    if not (args.work / "denoiser.pt").exists():
        return export_vae(pipe, args.work, args.out)
    export(pipe, args.work, args.out, args)


if __name__ == "__main__":
    main()

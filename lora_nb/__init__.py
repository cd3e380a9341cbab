"""lora_nb: LoRA fine-tuning of Stable Diffusion, small enough to read."""

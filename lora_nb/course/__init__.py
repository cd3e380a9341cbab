"""The course around the library: what the notebooks need besides LoRA itself.

The library (`lora_nb.layers` … `lora_nb.train`, `lora_nb.inference`) is what a user installs to train and
load LoRAs; it never imports this package. The course imports the library. Read it in this order:

- `tiny`: the embedded tiny Stable Diffusion (SD 1.5's classes and names, CPU-sized) and how to load it;
- `world`: the 64 px world the tiny model is pretrained on (parts, in plain words) and what only the
  LoRAs teach (the creatures' style, the DreamBooth subject); the shipped data sets;
- `evaluate`: what the figures are checked with (colour, shape, place, dots, style; held-out loss; subject
  fidelity; VAE reconstruction; a prompt suite per skill);
- `viz`, `attention`: the figures; cross-attention maps;
- `lesson`: what several notebooks do alike (the device and dtype to draw on, a subject fine-tune's scores);
- `sweep`: rank × target-set sweeps against a full fine-tune;
- `runner`, `site`: run the notebooks with papermill (`python -m lora_nb.course`), and the course site;
- `prefetch`, `rehearsal`: real mode — fetch SD 1.5 and the data set once; rehearse every notebook offline.
"""

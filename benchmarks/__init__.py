"""Measured speed, memory and size of lora_nb against the reference way (diffusers + peft).

Run everything with ``python -m benchmarks.run`` (see ``benchmarks/run.py``); it prints a table and writes
``BENCHMARKS.md``. Benchmarks are never collected as tests.
"""

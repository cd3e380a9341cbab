"""Profile the timed training steps of one loop of the step benchmark: where does a missed target go?

    python -m benchmarks.profile_step                      # lora_nb's trainer, cProfile, top 30 by own time
    python -m benchmarks.profile_step --loop reference     # or floor
    python -m benchmarks.profile_step --torch              # torch.profiler: operators instead of functions

Only the steps after the warm-up are profiled (the profiler starts and stops at step boundaries), so model
loading and caching stay out of the picture.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import torch

from .common import Settings, quiet
from .train_step import LOOPS, StepSetup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loop", choices=list(LOOPS), default="lora_nb")
    parser.add_argument(
        "--torch", action="store_true", help="torch.profiler operator table instead of cProfile"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumtime, ...)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    settings = Settings()
    if args.torch:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
        start, stop = profiler.__enter__, lambda: profiler.__exit__(None, None, None)
    else:
        profiler = cProfile.Profile()
        start, stop = profiler.enable, profiler.disable

    def on_step(step: int) -> None:
        if step == args.warmup:
            start()
        elif step == args.warmup + args.steps:
            stop()

    setup = StepSetup(settings.model, settings.data, warmup=args.warmup, steps=args.steps, on_step=on_step)
    with tempfile.TemporaryDirectory(prefix="lora_nb-profile-") as tmp, quiet():
        run = LOOPS[args.loop](setup, Path(tmp))
    print(
        f"{args.loop}: {run.per_step * 1e3:.1f} ms per step over {args.steps} steps "
        f"({torch.get_num_threads()} threads); profiled the same steps:\n"
    )
    if args.torch:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    else:
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()

"""Benchmarks of the networks, the pipeline and the data loaders: time, throughput, FLOPs, MFU, memory.

Workloads (the names `BenchOptions.workloads` takes):

- `unet`: one classifier-free-guidance U-Net step, inference: batch 2 (cond + uncond) at the latent
  size of `resolution` (512 px -> 64x64 latents for the SD VAE).
- `train`: one U-Net training step per (resolution, batch): autocast in the benchmark dtype over fp32
  weights, AdamW (fused on CUDA), MSE loss on random targets, backward, optimizer step.
- `vae`: VAE decode of one image at `resolution`.
- `generate`: `LDMPipeline.generate` of one image with DDIM and CFG for each step count, text encoding
  and VAE decode included.
- `data`: the data loaders alone at each training shape: the built-in shapes batches the trainer
  draws, the image-shard loader (PNG decode, resize) and the latent-shard loader.

Each row is the median of `repeats` timed calls after `warmup` untimed ones (CUDA events around each
call on GPUs, `time.perf_counter` elsewhere). FLOPs are counted once per workload with
`torch.utils.flop_counter.FlopCounterMode` on the eager model (the speed switches change how the
arithmetic runs, not how much of it there is); TFLOP/s is FLOPs / median time, and MFU is that over
the device's dense peak for the dtype. Peak memory is `torch.cuda.max_memory_allocated` over the
timed calls, models included, each workload building its own models on an empty device.

Modules: `options` (what to measure, the result rows), `measure` (timing, FLOP counting, device
peaks), `setup` (the random-weight model every workload copies), `workloads`, `vs_diffusers` (the
same networks in diffusers), `run` (`run_bench`, `format_table`), `load_memory` (peak RSS of loading
a full-size single file).

Weights are random, every float tensor drawn at unit activation scale (the zero-initialised output
layers included), so outputs are not trivially zero and the comparison with diffusers
(`vs_diffusers`: the same architecture built in diffusers with the same weights through
`ldm.convert.diffusers`) checks real numbers before it times anything.
"""

from .measure import count_flops, peak_tflops_for, relative_error, time_calls
from .options import WORKLOADS, BenchOptions, BenchResult, Row
from .run import format_table, run_bench
from .setup import randomize_weights_
from .vs_diffusers import AGREEMENT_TOLERANCE, MismatchError

__all__ = [
    "AGREEMENT_TOLERANCE",
    "WORKLOADS",
    "BenchOptions",
    "BenchResult",
    "MismatchError",
    "Row",
    "count_flops",
    "format_table",
    "peak_tflops_for",
    "randomize_weights_",
    "relative_error",
    "run_bench",
    "time_calls",
]

"""Measured speed and memory: ``make bench`` (``python -m lib.bench [--quick] [--only SECTION ...] [--out DIR]``).

Prints one table per section and writes ``results/benchmarks/<timestamp>.json`` (every row carries the
machine description) and ``results/benchmarks/README.md`` (the tables, and which targets of the
benchmark issue are met, with the numbers). Every ratio is measured side by side in the same run.
The sections, registered once in :data:`lib.bench.report.SECTIONS`:

1. ``ceiling``: dense matmul and Conv3d forward+backward GFLOP/s in fp32 and bf16; the ceiling of a
   dtype is the best of them. Always measured: the other sections' fractions need it (:mod:`lib.bench.measure`).
2. ``steps``: one training step of every model family at the demo and subset presets, fp32 and bf16
   autocast, beside the MONAI network of the nearest kind (:mod:`lib.bench.families`; the cases, one
   table keyed by the families of :data:`lib.families.FAMILIES`: :mod:`lib.bench.cases`).
3. ``attention``: wavelet against full attention at 32^3 ... 128^3, plus a PNG (:mod:`lib.bench.pretrain`).
4. ``infonce``: batched spatial InfoNCE against the loop reference (:mod:`lib.bench.pretrain`).
5. ``data``: ``.nii.gz`` decoding, the array cache and the 03_pretrain step's consumption (:mod:`lib.bench.data`).
6. ``diffusion``: DDIM time per frame at the demo size; VAE encode/decode frames/s (:mod:`lib.bench.families`).
7. ``memory``: the largest batch per family at prod on a 16 GB GPU, estimated from activation sizes
   measured on this CPU (:mod:`lib.bench.families`).
8. ``convert``: RSNA-like DICOM series to the prepared format with 1 and 2 workers, beside dcm2niix on the
   same series, and the projected time for the RSNA training set on 4 cores (:mod:`lib.bench.convert`).

Two extras (:data:`lib.bench.cli.EXTRAS`) run only when ``--only`` names them, each writing its own file
into the output folder: ``pretrain_step`` (03_pretrain's step at subset and prod, each in a fresh
process, and wavelet against full attention: ``pretrain_step.json``, :mod:`lib.bench.pretrain`) and
``train_loop`` (:func:`lib.train.fit` against a bare loop: ``train_loop_overhead.json``, :mod:`lib.bench.train`).

``--quick`` runs every section at tiny sizes with one repeat (well under a minute; what the unit test
runs): its numbers say that the code works, not how fast anything is.

Threads: torch's default (one per core), with ``OMP_WAIT_POLICY=PASSIVE`` as in the notebooks (``lib`` sets
it): idle OpenMP threads sleep, which on an idle machine makes steps of many small operations slower than
OpenMP's default spinning would (about 15 % for the diffusion denoiser), the same for both sides of every
comparison. Peak memory and times: :mod:`lib.bench.measure`.
"""

# Not the functions ``measure`` and ``report``: ``lib.bench.measure`` and ``lib.bench.report`` stay the modules.
from lib.bench.cli import EXTRAS, main
from lib.bench.measure import (ceiling, ceilings, count_flops, isolated, machine, machine_line, peak_rss_mb,
                               peak_tensor_mb, status_mb, train_step)
from lib.bench.report import SECTIONS, table, targets

__all__ = ["EXTRAS", "SECTIONS", "ceiling", "ceilings", "count_flops", "isolated", "machine", "machine_line", "main",
           "peak_rss_mb", "peak_tensor_mb", "status_mb", "table", "targets", "train_step"]

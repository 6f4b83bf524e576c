"""``make gpu-check``: the project on a real GPU, in one command that ends within 8 minutes.

How to run it on a GPU box (PyTorch with CUDA installed, none of this project's other packages, no network):

1. Here, on a machine that reaches PyPI, once per change of pins: ``make gpu-wheels`` (``python -m
   lib.gpu_check wheels``; ``GPU_PYTHON_VERSION=3.12`` by default, the Python of the box) fills
   ``build/gpu-wheels/``: the wheels of everything the project needs but torch, for that Python on
   manylinux x86_64, and the Kaggle bundle's own wheels in ``kaggle/``. It prints their size against the
   64 MiB that may travel with the repository, and what it left out to fit and why (``manifest.json``:
   first what the check does not use, then what PyTorch images usually carry, e.g. numpy, scipy, pandas,
   matplotlib, scikit-*).
2. Copy the repository and ``build/gpu-wheels/`` to the box. There, in the repository root:
   ``make gpu-check`` (``python3 -m lib.gpu_check run``; ``GPU_PYTHON=...`` names the interpreter that has
   torch). Only the standard library and torch need to be importable: it first installs the wheels that
   the box lacks (or has at another version) offline into ``build/gpu-check/site/``.

It writes ``results/benchmarks/gpu-<YYYYMMDD-HHMMSS>.json`` (rewritten atomically after every stage, so a
killed check still leaves what it measured) and prints one line per stage; the run folders go under
``build/gpu-check/<stamp>/``. Exit status 1 when a stage failed. Each stage records ``status`` (ok, failed,
skipped), ``reason``, ``seconds``, its ``timeout_s``, its numbers (``data``) and the tail of any error:

- ``install``: what was installed from which folder, what the box already had, what no wheel covered;
- ``environment``: Python, torch, CUDA and cuDNN versions, every GPU's name, capability, memory and bf16
  support, the versions of the project's packages, and any module that fails to import;
- ``data``: the smoke cohort (and the RSNA mini competition) built for the notebooks;
- ``notebooks``: every training notebook (03, 04, 05, 06, 09) at smoke with papermill on CUDA, once per
  autocast dtype (``$MEDIMG_AMP_DTYPE``: float16 with the gradient scaler, as on a T4, and bfloat16 where
  the GPU has it), each run's folder, status, seconds and the autocast dtype its run.json recorded;
- ``kaggle``: 03's internet-off Kaggle bundle built from the bundle's wheels, laid out as Kaggle mounts it
  (input/datasets/<user>/medimg-lib-code, a read-only smoke cohort, working/) and run there in a kernel
  that sees neither the repository nor the bundle's packages: where lib came from, what the bundle's
  bootstrap installed, the run's status;
- ``ddp``: with two or more GPUs, ``torchrun --nproc_per_node 2 -m lib.launch 03_pretrain --preset smoke``
  and its run record (skipped, saying why, with fewer);
- ``steps``: every trained network's optimizer step at subset beside its MONAI peer (the pairs of ``make
  bench``), per dtype: ms, GFLOP per step and GFLOP/s (counted as :mod:`lib.bench` counts them),
  ``torch.cuda.max_memory_allocated`` over the step, the time a T4 would take at the FLOP rate
  :mod:`lib.bench` assumes, and section 7's memory estimate for the same step with the measured/estimated
  ratio ("estimate unavailable: ..." where the estimator cannot say).

Stages run in that order (notebooks and kaggle side by side), each within its own limit and what the
budget (``--budget-s``, 470 s) has left; a stage that would get less than it needs is skipped with the
reason. ``python -m lib.gpu_check run --device cpu --quick`` checks the check itself on a CPU (03 only,
one family's step at smoke; ``tests/test_gpu_check.py``).
"""

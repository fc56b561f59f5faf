"""Figures that show what a diffusion model does: noising, denoising, schedules, curves (training,
evaluation), the bound.

Every figure function writes a PNG (curves also as SVG next to it) and returns the PNG's path;
``path`` may be any etils.epath path (local or gs://). Pixel sizes are fixed by the arguments
(documented per function), so that figures can be laid out and compared.

Timesteps are 0-indexed as in the rest of diffjax (``t = 0`` is the paper's t = 1); labels in the
figures show the paper's index.

Command line: ``python -m diffjax.viz --workdir=RUN`` writes every figure of a trained run into
``RUN/figures/`` (:func:`write_run_figures`).

Modules: ``strips`` (image strips), ``curves`` (plots), ``events`` (TensorBoard scalars),
``run_figures`` (all figures of a run, the command line), ``canvas`` (shared plumbing).
"""

from diffjax.viz.curves import evaluation_curves, schedule_curves, training_curves, vlb_terms
from diffjax.viz.events import read_scalars
from diffjax.viz.run_figures import main, write_run_figures
from diffjax.viz.strips import forward_process_strip, reverse_process_strip, sample_comparison

__all__ = [
    "evaluation_curves",
    "forward_process_strip",
    "main",
    "read_scalars",
    "reverse_process_strip",
    "sample_comparison",
    "schedule_curves",
    "training_curves",
    "vlb_terms",
    "write_run_figures",
]

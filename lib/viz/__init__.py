"""Figures. Every figure a notebook shows is also saved as PNG in its run folder (``Run.save_figure``).

:mod:`lib.viz.core`: slices, grids, histograms, interactive viewers, loss curves, GIFs, the results table;
:mod:`lib.viz.families`: the figures of the model families' notebooks (03-06).
"""

from lib.viz.core import (VIEW_WINDOWS, compare_figure, compare_viewer, dataset_bars, histograms,  # noqa: F401
                          loss_curves, oriented_slice, results_table_figure, run_browser, save_gif, slice_grid,
                          slice_viewer)
from lib.viz.families import (cxr_change_pairs, label_efficiency, cxr_masked_reconstruction, cxr_real_radiograph,  # noqa: F401
                              frame_strips, reconstruction_figure, step_curves, xray_to_ct_reconstruction)

"""Independent readers the converter tests compare against (not the project's code), and running a notebook as a user does."""

import nibabel as nib
import numpy as np


def sitk_series(folder):
    """The DICOM series in ``folder`` read by SimpleITK's ImageSeriesReader (GDCM's file order), as a RAS
    NIfTI image."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32)
    return nib.as_closest_canonical(nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps))


def execute_notebook(name, out, **parameters):
    """Run ``notebooks/<name>.ipynb`` headless with papermill, as a user does, into ``out``."""
    import papermill

    from lib import paths

    return papermill.execute_notebook(str(paths.NOTEBOOKS_DIR / f"{name}.ipynb"), str(out), parameters=parameters,
                                      kernel_name="python3", progress_bar=False)


def only_run(results, notebook):
    """``(run folder, run.json)`` of the one run of ``notebook`` under the results root ``results``."""
    import json

    (run_dir,) = (results / notebook).iterdir()
    return run_dir, json.loads((run_dir / "run.json").read_text())

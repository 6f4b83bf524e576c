"""Parameters and presets of 01_explore_data and 02_prepare_data: see :mod:`lib.config` for what a preset is."""

from lib.config import Param, _spec

NB_01 = _spec(
    "manifest status and a look at the local image files",
    {
        "max_files": Param(400, int, "at most this many local image files have their headers read", range=">=1"),
        "n_preview": Param(8, int, "middle slices shown in the preview grid", range=">=1"),
        "hist_files": Param(3, int, "files per dataset and modality whose intensities are histogrammed", range=">=0"),
        "prepared": Param("", str, "comma-separated prepared datasets to survey (folders or names); '' = every one on this machine"),
        "refused_rows": Param(20, int, "refused items listed per prepared dataset (all are in report.csv)", range=">=0"),
    },
    smoke={"max_files": 100, "n_preview": 4, "hist_files": 1},
    demo={},
    subset={"max_files": 2000, "n_preview": 12},
    prod={"max_files": 10000, "n_preview": 12, "hist_files": 5},
)

NB_02 = _spec(
    "build or fetch, verify, preprocess and cache the data",
    {
        "cohort": Param("demo", str, "built-in cohort size to build and prepare (lib.data.demo)", ("smoke", "demo")),
        "rebuild": Param(False, bool, "rebuild the cohort even if it verifies against data_manifest.csv"),
        "fetch": Param("", str, "comma-separated real datasets of data_manifest.csv to download (opt-in; needs credentials)"),
        "spacing": Param(None, (float, type(None)), "isotropic spacing (mm) of prepared volumes; None keeps the grid", range=">0"),
        "prep_size": Param(64, int, "prepared volumes are centre-cropped or padded to this size (voxels per axis)", range=">=1"),
        "throughput_files": Param(24, int, "volumes read to measure decoding .nii.gz against the cache", range=">=1"),
        "convert": Param("", str, "real datasets to convert into <data root>/prepared/NAME: comma-separated names, "
                         "'auto' (every one whose raw download is found: data root, /kaggle/input, src) or '' (none)"),
        "src": Param("", str, "raw download folders, NAME=FOLDER[,NAME=FOLDER] (default: found under the data root or /kaggle/input)"),
        "workers": Param(2, int, "conversion processes", range=">=1"),
        "shard": Param("", str, "I/N: convert only this machine's share (1..N) of each dataset; '' = all"),
        "convert_limit": Param(None, (int, type(None)), "convert at most this many items per dataset (a trial run); None = all", range=">=1"),
        "convert_spacing": Param(None, (float, type(None)), "resample converted images to cubic voxels of this many mm "
                                 "(03 prod trains at 1 mm; keeps Kaggle outputs small); None or 0 keeps each image's grid", range=">0"),
    },
    smoke={"cohort": "smoke", "prep_size": 48, "throughput_files": 4},
    demo={},
    subset={"spacing": 1.5, "prep_size": 128, "convert": "auto", "workers": 4, "convert_spacing": 1.0},
    prod={"spacing": 1.0, "prep_size": 160, "convert": "auto", "workers": 4, "convert_spacing": 1.0},
)

NOTEBOOKS = {"01_explore_data": NB_01, "02_prepare_data": NB_02}

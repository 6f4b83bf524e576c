import numpy as np
import pandas as pd

from lib import downstream
from lib.data.io import load_volume


def test_positive_patches_hold_the_blob_and_negatives_do_not(smoke_cohort):
    data = downstream.blob_patches(smoke_cohort, "train", 16, per_subject=3, with_centres=True)
    subjects = pd.read_csv(smoke_cohort / "subjects.csv", dtype={"subject": str}).query("split == 'train'")
    x, y, where = data["CT"]
    assert x.shape[1:] == (3, 16, 16, 16) and data["MRI"][0].shape[1:] == (1, 16, 16, 16)
    ct = subjects[subjects["dataset"] == "head_ct"]
    assert int(y.sum()) == 3 * int(ct["aneurysm"].sum()) and len(y) == 3 * (len(ct) + int(ct["aneurysm"].sum()))
    for label, (subject, centre) in zip(y.tolist(), where):
        mask = load_volume(smoke_cohort / "head_ct" / subject / "aneurysm.nii.gz").array[0]
        lo = np.array(centre) - 8
        inside = mask[lo[0]:lo[0] + 16, lo[1]:lo[1] + 16, lo[2]:lo[2] + 16].sum()
        assert (inside > 0) == bool(label), (subject, centre, label)


def test_patches_are_deterministic(smoke_cohort):
    a = downstream.blob_patches(smoke_cohort, "test", 16)
    b = downstream.blob_patches(smoke_cohort, "test", 16)
    assert all(np.array_equal(a[m][0], b[m][0]) for m in a)

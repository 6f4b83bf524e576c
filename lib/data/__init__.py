"""Data: files to tensors.

io (NIfTI to RAS volumes), dicom (series to volumes), transforms (CT windows, resampling, crop/pad),
demo + phantoms + drr (the built-in cohort), manifest (datasets, checksums, verify, fetch), cache
(preprocessed arrays), datasets (loaders), survey (headers of whatever is on disk).
"""

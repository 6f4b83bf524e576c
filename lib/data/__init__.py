"""Data: files to tensors.

prepared (the one dataset format every notebook reads: ``dataset_format.md``), convert (raw downloads ->
prepared datasets, one module per dataset; ``python -m lib.data.convert``), fixtures (small raw datasets
in each source's exact layout), locate (where raw and prepared data are: data root, Kaggle inputs),
io (NIfTI to RAS volumes), dicom (series to volumes), transforms (CT windows, resampling, crop/pad),
demo + phantoms + drr (the built-in cohort), manifest (datasets, checksums, verify, fetch), cache
(preprocessed arrays), datasets (loaders), survey (headers of whatever is on disk, prepared datasets).
"""

"""Data: files to tensors. Manifest of datasets, local survey, (later) I/O, demo cohort, loaders."""

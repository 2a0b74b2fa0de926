"""The study workflow: BIDS discovery, the batch labeling of a dataset, its table, the QC report and
the import of corrections."""

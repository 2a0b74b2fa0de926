"""MRI intervertebral discs: volume geometry, the midsagittal plane, the networks, labeling, export,
phantoms, synthetic spines, stress variants, evaluation; training in ``mri.training``."""

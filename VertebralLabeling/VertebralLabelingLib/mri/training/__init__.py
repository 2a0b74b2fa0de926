"""Training of the MRI disc networks: samples (real, PAM50, phantoms, synthetic) and the training loop."""

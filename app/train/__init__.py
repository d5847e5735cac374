"""Training of the embedded demo model (VQVAE, then VAR) and of the classifier that judges its images."""

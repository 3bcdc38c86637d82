"""Training: the explicit loop on accelerate, EMA, atomic training state, the VAE and LDM trainers."""

"""Z-Image-Turbo model, settings and server launcher for NVIDIA Triton (Python backend)."""

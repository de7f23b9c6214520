"""The on-disk format: manifest, tensors, validation. Torch-free."""

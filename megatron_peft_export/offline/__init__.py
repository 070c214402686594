"""Offline export: read the adapter tensors (and only those) of saved Megatron checkpoints, on CPU."""

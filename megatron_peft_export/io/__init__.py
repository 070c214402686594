"""File input and output: safe reading, adapter directories, checkpoints, safetensors."""

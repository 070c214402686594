"""File input and output: safe reading, the HF PEFT adapter directory (`peft_dir`), Megatron's checkpoint layout
(`checkpoints`), safetensors."""

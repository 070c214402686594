"""The pure conversion core: no torch.distributed, no megatron imports, no file I/O."""

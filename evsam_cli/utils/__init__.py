"""Process-level helpers shared by the commands: devices, torch.distributed, atomic file output."""

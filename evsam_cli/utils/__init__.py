"""Process-level helpers shared by the commands: devices, core counts, torch.distributed, atomic
file output."""

"""Training: the shared loop, distillation, end-to-end finetuning, losses and prompt sampling."""

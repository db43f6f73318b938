"""A run resolved once (prepare), the one training loop, evaluation, config and the process group helpers."""

"""Real quantized checkpoints of a keep-list, written in a deployment tool's own format."""

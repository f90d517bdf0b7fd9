"""The cost-broadcaster: the chip's output stage (forward pass, C̃ extraction, broadcast)."""

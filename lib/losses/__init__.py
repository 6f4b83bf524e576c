"""Losses and masking: tensors in, numbers out, one family per module."""

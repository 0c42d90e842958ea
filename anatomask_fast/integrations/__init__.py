"""Adapters that bring AnatoMask's masks and fused ops to other libraries' models."""

"""Flax modules and the per-layer functions the engines compose."""

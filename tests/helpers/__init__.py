"""Shared test fixtures (tiny Stable Diffusion components, original-format single files)."""

"""Noise schedules, samplers (one table) and the denoiser wrappers (guidance, prediction type)."""

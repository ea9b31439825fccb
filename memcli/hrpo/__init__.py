"""HRPO latent reasoning: hybrid token/latent decoding and GRPO training (Yue et al. 2025)."""

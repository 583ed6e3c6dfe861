"""semloss_jax: Toxicity-Avoiding SFT (TA-SFT) with a bounded semantic EMD loss, in JAX/Flax."""

__version__ = "0.1.0"

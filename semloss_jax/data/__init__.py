"""Data: the pinned-archive fetcher, one record schema and its file readers, the registry
sources and the named sets built from them, seeded no-leak splits, tokenized training batches
and their resumable streams, and the harvest of D_harmful (`python -m semloss_jax.data`)."""

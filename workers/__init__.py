"""Model-side code: loading a model folder, tokenizing, encoding, pooling.

Nothing here imports Ray or Prefect, so the encoder runs and benchmarks on a machine that has only torch,
transformers and pyarrow (the lent GPU box).
"""

"""Recipes built on hf_prune: the packaged demo model and tweet-sentiment data.

Nothing in the library core imports this package; only ``hf-prune train`` / ``hf-prune benchmark`` (for their
defaults when no model or data is given), the scripts under ``benchmarks/`` and the tests do. Import the submodule
directly:

- :mod:`hf_prune.recipes.packaged`: the packaged all-MiniLM-L6-v2 and tweet sentiment CSV, with one fixed split.

The dense-vs-pruned job itself is the `hf-prune train` command, :mod:`hf_prune.commands.job`, and works on any model
and data.
"""

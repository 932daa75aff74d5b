"""Recipes built on hf_prune: the packaged demo model and tweet-sentiment data, and the dense-vs-pruned main job.

Nothing in the library core imports this package; only ``hf-prune train`` / ``hf-prune benchmark`` (for their
defaults), the scripts under ``benchmarks/`` and the tests do. Import the submodules directly:

- :mod:`hf_prune.recipes.packaged`: the packaged all-MiniLM-L6-v2 and tweet sentiment CSV, with one fixed split;
- :mod:`hf_prune.recipes.job`: fine-tune a dense and a pruned model side by side and compare them.
"""

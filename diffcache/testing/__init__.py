"""Toy pipelines and toy methods for tests of diffcache and of methods written on it.

``toys`` has a toy DiT-style pipeline (step, block and module sites) and the toy methods
``toy_blocks`` / ``toy_modules`` / ``toy_static``; ``toys_seq`` a toy masked-diffusion text LM and a
toy next-scale model with the KV methods ``toy_kv`` / ``toy_budget``. Importing a module registers
its toy methods (and ``toys_seq`` its adapters); ``golden`` computes and checks the golden outputs
and Stats of the bundled plans (tests/golden/). Nothing here is imported by ``diffcache`` itself.
"""

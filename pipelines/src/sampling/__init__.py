"""Text-diffusion sampler components: pure torch functions over one step's candidates.

``llada``: LLaDA's fixed per-step counts, fp64 Gumbel-max sampling, low-confidence / random
confidences, the EOS/EoT options, CFG mixing. ``dream``: Dream's ``sample_tokens``, confidence
algorithms, per-step count and ``origin`` reveal. ``stats``: the fused confidence statistics
(Triton) both take at T = 0 when a plan's kernel backend picks them. ``rules``: which
candidates to commit (top-k, Fast-dLLM's threshold and factor rules, Elastic-Cache's confident
set, Dream's sampled commit).
d²Cache's certainty density, nucleus selection and inflation are its method's
(``diffcache.methods.d2cache_prior``; its cache policy uses them too).

Contract: candidates come as ``[B, m]`` padded sets (``valid`` marks the real ones) with their
logits ``[B, m, V]``; every decision is per row. Random draws take ``None`` (the global
generator), one ``torch.Generator``, or a list with one generator per row; with a list, row b
draws only from generator b and only for its valid candidates, so a batch decodes exactly as
its rows would alone.
"""

from diffcache.pipelines.sampling import dream, llada, rules, stats

__all__ = ["dream", "llada", "rules", "stats"]

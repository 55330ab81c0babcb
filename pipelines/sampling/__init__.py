"""Text-diffusion sampler components, pure torch functions over the candidates of one step.

``llada``: LLaDA's fixed per-step counts, fp64 Gumbel-max sampling, low-confidence / random
scores, EOS/EoT options, CFG. ``dream``: Dream's token sampling, confidence algorithms and
count rule. ``rules``: which candidates to commit (top-k, Fast-dLLM's threshold and factor
rules, Elastic-Cache's confident set, Dream's sampled commit). d²Cache's certainty prior is
in ``diffcache.kv.prior`` (its cache policy uses it too).

Candidates come as ``[B, m]`` padded sets (``valid`` marks the real ones) with their logits
``[B, m, V]``; every decision is per row. Random draws take one ``torch.Generator``, or a list
with one generator per row (then a row's draws do not depend on its batch-mates).
"""

from diffcache.pipelines.sampling import dream, llada, rules

__all__ = ["dream", "llada", "rules"]

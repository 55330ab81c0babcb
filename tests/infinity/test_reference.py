"""The whole generation against a slow reference written from research/var.md §1.2.3 over the
raw state dict: per row only the valid text tokens (upstream's compaction), per-head loops,
RoPE as complex rotations, upstream's plain ``torch.cat`` cache, float64. The model's RoPE
table is float32 as upstream's (angles within ~1e-7), hence logits within 1e-6; bits equal."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6


def ln(x):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + EPS)


def gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def linear(w, name, x):
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def softmax_attend(q, k, v, scale):
    return torch.softmax(q @ k.T * scale, -1) @ v


def text_attention(w, p, q, t, heads):
    """Cross-attention (``p`` the module prefix) of queries ``q [n, C]`` over one row's valid
    text ``t [len, Ckv]``."""
    kv = t @ w[p + ".mat_kv.weight"].T
    c = kv.shape[-1] // 2
    k, v = kv[:, :c], kv[:, c:] + w[p + ".v_bias"]
    hd = c // heads
    out = torch.cat(
        [
            softmax_attend(
                q[:, h * hd : (h + 1) * hd],
                k[:, h * hd : (h + 1) * hd],
                v[:, h * hd : (h + 1) * hd],
                hd**-0.5,
            )
            for h in range(heads)
        ],
        -1,
    )
    return linear(w, p + ".proj", out)


def rotate(x, h, w, final):
    """RoPE of one map's rows ``x [h*w, d]``: pair m as a complex number times e^{i angle}."""
    d = x.shape[-1]
    half, quarter = d // 2, d // 4
    out = torch.empty_like(x)
    for t in range(h * w):
        i, j = divmod(t, w)
        for m in range(half):
            pos = round(i * final / h) if m < quarter else round(j * final / w)
            a = pos * 10000.0 ** (-2 * (m % quarter) / half)
            z = complex(x[t, 2 * m].item(), x[t, 2 * m + 1].item()) * complex(
                math.cos(a), math.sin(a)
            )
            out[t, 2 * m], out[t, 2 * m + 1] = z.real, z.imag
    return out


def reference(w, config, texts, sides, cfg, tau, top_p, g):
    """Bits and logits per scale. ``texts``: each prompt's valid T5 features ``[len, Ct5]``."""
    b, c, heads, depth = len(texts), config.embed_dim, config.num_heads, config.depth
    per = depth // config.block_chunks
    rows = list(texts)
    if cfg != 1:
        rows += [w["cfg_uncond"][: len(t)] for t in texts]
    normed = [
        t * torch.rsqrt((t**2).mean(-1, keepdim=True) + EPS) * w["text_norm.weight"] for t in rows
    ]
    pool_heads = config.pool_heads
    pooled = []
    for t in normed:
        q = w["text_proj_for_sos.ca.mat_q"].reshape(1, -1)
        pooled.append(text_attention(w, "text_proj_for_sos.ca", q, t, pool_heads)[0])
    cond = torch.stack(pooled)  # [R, C]
    ca_text = [
        linear(w, "text_proj_for_ca.2", gelu(linear(w, "text_proj_for_ca.0", t))) for t in normed
    ]
    shared = linear(w, "shared_ada_lin.1", F.silu(cond)).reshape(-1, 6, c)
    x = [cond[r][None] + w["pos_start"][0] for r in range(len(rows))]
    cache = {}
    d = config.d_vae
    final = sides[-1]
    summed = torch.zeros(b, d, final, final, dtype=torch.float64)
    bits_out, logits_out = [], []
    for si, side in enumerate(sides):
        hidden = []
        for r in range(len(rows)):
            h = x[r] + w["lvl_embed.weight"][si]
            for layer in range(depth):
                p = f"block_chunks.{layer // per}.module.{layer % per}."
                g1, g2, s1, s2, sh1, sh2 = w[p + "ada_gss"][0, 0] + shared[r]
                a = ln(h) * (1 + s1) + sh1
                qkv = a @ w[p + "sa.mat_qkv.weight"].T
                qkv = qkv + torch.cat(
                    (w[p + "sa.q_bias"], torch.zeros(c, dtype=qkv.dtype), w[p + "sa.v_bias"])
                )
                hd = c // heads
                mul = w[p + "sa.scale_mul_1H11"].reshape(-1).clamp(max=math.log(100)).exp()
                outs = []
                for hh in range(heads):
                    sl = slice(hh * hd, (hh + 1) * hd)
                    q, k, v = qkv[:, sl], qkv[:, c:][:, sl], qkv[:, 2 * c :][:, sl]
                    q = rotate(q / q.norm(dim=-1, keepdim=True) * mul[hh], side, side, final)
                    k = rotate(k / k.norm(dim=-1, keepdim=True), side, side, final)
                    key = (r, layer, hh)
                    ks, vs = cache.get(key, (k[:0], v[:0]))
                    cache[key] = (torch.cat((ks, k)), torch.cat((vs, v)))
                    outs.append(softmax_attend(q, *cache[key], 1.0))
                h = h + linear(w, p + "sa.proj", torch.cat(outs, -1)) * g1
                qn = F.layer_norm(h, (c,), w[p + "ca_norm.weight"], w[p + "ca_norm.bias"], EPS)
                h = h + text_attention(
                    w, p + "ca", linear(w, p + "ca.mat_q", qn), ca_text[r], heads
                )
                f = ln(h) * (1 + s2) + sh2
                h = h + linear(w, p + "ffn.fc2", gelu(linear(w, p + "ffn.fc1", f))) * g2
            scale, shift = linear(w, "head_nm.ada_lin.1", F.silu(cond[r])).reshape(2, c)
            hidden.append(linear(w, "head", ln(h) * (1 + scale) + shift) / tau)
        logits = torch.stack(hidden)
        if cfg != 1:
            logits = cfg * logits[:b] + (1 - cfg) * logits[b:]
        probs = logits.reshape(-1, 2).softmax(-1)
        low = probs.min(-1).values <= 1 - top_p
        probs[low] = F.one_hot(probs[low].argmax(-1), 2).double()
        bits = torch.multinomial(probs, 1, True, generator=g).reshape(b, side * side, d)
        bits_out.append(bits)
        logits_out.append(logits)
        codes = (bits.double() * 2 - 1) / math.sqrt(d)
        codes = codes.reshape(b, side, side, d).permute(0, 3, 1, 2)[:, :, None]
        summed = summed + F.interpolate(codes, size=(1, final, final), mode="trilinear")[:, :, 0]
        if si + 1 < len(sides):
            nxt = F.interpolate(
                summed[:, :, None], size=(1, sides[si + 1], sides[si + 1]), mode="trilinear"
            )
            tokens = nxt[:, :, 0].flatten(2).transpose(1, 2)
            x = [linear(w, "word_embed", tokens[r % b]) for r in range(len(rows))]
    return bits_out, logits_out


def test_generation_matches_the_reference(pipe):
    pipe.transformer.double()
    prompts = ["a red fox", "two cats on a boat in the rain"]
    with torch.no_grad():  # as the pipeline runs T5 (its kernels round differently with grad)
        feats, mask = pipe.conditions(prompts, None, False)
    texts = [f[m].double() for f, m in zip(feats, mask, strict=True)]
    w = pipe.transformer.state_dict()
    sides = (1, 2, 4, 6, 8)
    for cfg, tau in ((3.0, 1.0), (1.0, 0.7)):
        g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        out = pipe(prompts, cfg=cfg, tau=tau, top_p=0.97, generator=g1, output_type="codes")
        bits, logits = reference(w, pipe.transformer.config, texts, sides, cfg, tau, 0.97, g2)
        for si in range(len(sides)):
            torch.testing.assert_close(
                out.logits[si], logits[si], rtol=0, atol=1e-6, msg=f"scale {si} cfg {cfg}"
            )
            assert torch.equal(out.bits[si], bits[si]), si
        assert torch.equal(g1.get_state(), g2.get_state())

"""Independent numpy reference for llama2.c checkpoints (test-only).

This file deliberately shares no code with ``tools/llama2c_to_hf.py``: it has
its own reader, works on the weights exactly as llama2.c stores them
(interleaved RoPE pairs, no row permutation), and follows ``forward`` in
karpathy/llama2.c's ``run.c`` step by step: one token at a time with a
key/value cache.  Only the arithmetic type changes: float64 by default.

    logits = forward_logits("stories260K.bin", [1, 42, 7])   # (3, vocab) float64
"""

import struct

import numpy as np


def load_checkpoint(path, dtype=np.float64):
    """Return (cfg, weights) with the weights converted to ``dtype``."""
    with open(path, "rb") as f:
        raw = f.read()
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    cfg = dict(zip(names, struct.unpack("<7i", raw[:28])))
    cfg["shared"] = cfg["vocab_size"] > 0
    cfg["vocab_size"] = abs(cfg["vocab_size"])
    cfg["head_size"] = cfg["dim"] // cfg["n_heads"]
    cfg["kv_dim"] = cfg["dim"] * cfg["n_kv_heads"] // cfg["n_heads"]

    data = np.frombuffer(raw, dtype="<f4", offset=28)
    dim, hid, L = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    V, kv, S, hs = cfg["vocab_size"], cfg["kv_dim"], cfg["seq_len"], cfg["head_size"]
    w, ptr = {}, 0

    def take(name, *shape):
        nonlocal ptr
        n = int(np.prod(shape))
        assert ptr + n <= data.size, f"{path} is truncated at {name}"
        w[name] = data[ptr:ptr + n].reshape(shape).astype(dtype)
        ptr += n

    # Same order as checkpoint_init_weights() in run.c.
    take("token_embedding_table", V, dim)
    take("rms_att_weight", L, dim)
    take("wq", L, dim, dim)
    take("wk", L, kv, dim)
    take("wv", L, kv, dim)
    take("wo", L, dim, dim)
    take("rms_ffn_weight", L, dim)
    take("w1", L, hid, dim)
    take("w2", L, dim, hid)
    take("w3", L, hid, dim)
    take("rms_final_weight", dim)
    take("freq_cis_real", S, hs // 2)   # legacy RoPE tables: kept only so tests
    take("freq_cis_imag", S, hs // 2)   # can check them; forward() recomputes RoPE
    if cfg["shared"]:
        w["wcls"] = w["token_embedding_table"]
    else:
        take("wcls", V, dim)
    assert ptr == data.size, f"{path}: {data.size - ptr} unexpected trailing floats"
    return cfg, w


def rmsnorm(x, weight):
    # run.c: o = weight * x / sqrt(mean(x^2) + 1e-5)
    return weight * (x / np.sqrt(np.mean(x * x) + 1e-5))


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / np.sum(e)


def rope_interleaved(vec, pos, head_size, theta=10000.0):
    """Rotate pairs (vec[i], vec[i+1]), i even, by angle pos * theta^(-(i % head_size)/head_size)."""
    out = vec.copy()
    for i in range(0, vec.size, 2):
        freq = 1.0 / theta ** ((i % head_size) / head_size)
        c, s = np.cos(pos * freq), np.sin(pos * freq)
        v0, v1 = vec[i], vec[i + 1]
        out[i] = v0 * c - v1 * s
        out[i + 1] = v0 * s + v1 * c
    return out


def forward(cfg, w, token, pos, key_cache, value_cache):
    """One step of run.c's forward(): logits for ``token`` at position ``pos``.

    key_cache / value_cache have shape (n_layers, seq_len, kv_dim) and are
    filled at row ``pos`` (positions < pos must already be filled).
    """
    dim, hs = cfg["dim"], cfg["head_size"]
    kv_mul = cfg["n_heads"] // cfg["n_kv_heads"]   # query heads sharing one kv head
    x = w["token_embedding_table"][token].copy()

    for l in range(cfg["n_layers"]):
        # --- attention block ---
        xb = rmsnorm(x, w["rms_att_weight"][l])
        q = w["wq"][l] @ xb                     # (dim,)
        k = w["wk"][l] @ xb                     # (kv_dim,)
        v = w["wv"][l] @ xb                     # (kv_dim,)
        q = rope_interleaved(q, pos, hs)
        k = rope_interleaved(k, pos, hs)
        key_cache[l, pos] = k
        value_cache[l, pos] = v

        att_out = np.zeros(dim, dtype=x.dtype)
        for h in range(cfg["n_heads"]):
            qh = q[h * hs:(h + 1) * hs]
            kvh = h // kv_mul                    # GQA: the kv head this query head reads
            keys = key_cache[l, :pos + 1, kvh * hs:(kvh + 1) * hs]     # (pos+1, hs)
            vals = value_cache[l, :pos + 1, kvh * hs:(kvh + 1) * hs]
            att = softmax(keys @ qh / np.sqrt(hs))                     # (pos+1,)
            att_out[h * hs:(h + 1) * hs] = att @ vals
        x = x + w["wo"][l] @ att_out

        # --- feed-forward block (SwiGLU): w2(silu(w1 x) * w3 x) ---
        xb = rmsnorm(x, w["rms_ffn_weight"][l])
        h1 = w["w1"][l] @ xb
        h3 = w["w3"][l] @ xb
        x = x + w["w2"][l] @ (h1 / (1.0 + np.exp(-h1)) * h3)

    x = rmsnorm(x, w["rms_final_weight"])
    return w["wcls"] @ x


def forward_logits(path_or_model, ids, dtype=np.float64):
    """Logits (T, vocab) for every position of ``ids``, computed in ``dtype``.

    ``path_or_model`` is a .bin path or a ``(cfg, weights)`` pair from
    load_checkpoint (pass the pair to avoid re-reading the file).
    """
    if isinstance(path_or_model, tuple):
        cfg, w = path_or_model
        dtype = w["wq"].dtype
    else:
        cfg, w = load_checkpoint(path_or_model, dtype)
    shape = (cfg["n_layers"], cfg["seq_len"], cfg["kv_dim"])
    key_cache, value_cache = np.zeros(shape, dtype), np.zeros(shape, dtype)
    return np.stack([forward(cfg, w, int(t), pos, key_cache, value_cache)
                     for pos, t in enumerate(ids)])


def greedy(path_or_model, prompt, steps, dtype=np.float64):
    """Greedy continuation: repeatedly append argmax of the last logits."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(forward_logits(path_or_model, ids, dtype)[-1])))
    return ids

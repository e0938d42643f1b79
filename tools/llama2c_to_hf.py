#!/usr/bin/env python3
"""Convert a llama2.c checkpoint (``.bin``) into a Hugging Face Llama directory.

Usage::

    python tools/llama2c_to_hf.py IN.bin OUT_DIR

The llama2.c file (karpathy/llama2.c, "legacy" version-0 export) is:

* a header of seven little-endian int32:
  ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``;
  a *negative* ``vocab_size`` means the classifier is NOT shared with the
  token embedding and is stored at the end of the file;
* then float32 arrays, every matrix stored (out, in) row-major, in this order:
  token embedding (vocab, dim); attention RMSNorm (L, dim); wq (L, dim, dim);
  wk (L, kv_dim, dim); wv (L, kv_dim, dim); wo (L, dim, dim);
  FFN RMSNorm (L, dim); w1 = gate (L, hidden, dim); w2 = down (L, dim, hidden);
  w3 = up (L, hidden, dim); final RMSNorm (dim); two RoPE tables
  (seq_len, head_size/2) each, which we skip; classifier (vocab, dim) if unshared.

The output is ``config.json`` + ``model.safetensors`` in the layout of
``transformers.LlamaForCausalLM``.  The only non-trivial step is RoPE:

* llama2.c rotates *adjacent* pairs of each head, (x[2i], x[2i+1]);
* HF's ``rotate_half`` rotates (x[i], x[i + head_size/2]).

Both use the same frequency for pair i, so we only have to reorder the rows
of wq and wk inside every head: the new row ``j*half + i`` is the old row
``2*i + j`` (j = 0 for the "real" part, 1 for the "imaginary" part).  This is
the inverse of the ``permute`` in llama2.c's export.py and equal to HF's
``permute`` in convert_llama_weights_to_hf.py.  Attention scores q.k are
invariant under applying the same reordering to q and k, so nothing else
(wv, wo) changes.
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

HEADER_INTS = 7          # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
HEADER_BYTES = 4 * HEADER_INTS
FLOAT_BYTES = 4          # every array is float32


class ConversionError(Exception):
    """A problem with the input or output that deserves a one-line message."""


def read_header(path):
    """Return the header as a dict, plus ``shared`` (bool) and ``kv_dim``."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if os.path.getsize(path) < HEADER_BYTES:
        raise ConversionError(f"{path}: too short for a llama2.c header ({os.path.getsize(path)} bytes)")
    ints = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(ints[0]) == 0x616B3432:          # b"ak42": llama2.c's newer versioned exports
        raise ConversionError(f"{path}: versioned llama2.c export (magic 'ak42'); only the legacy format is supported")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(v) for v in ints)
    shared = vocab > 0                      # negative vocab_size => unshared classifier
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 \
            or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ConversionError(f"{path}: implausible llama2.c header {ints.tolist()}")
    return dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads,
                n_kv_heads=n_kv_heads, vocab=vocab, seq_len=seq_len, shared=shared,
                kv_dim=dim * n_kv_heads // n_heads)


def array_shapes(h):
    """The float32 arrays of the file, in file order, as (name, shape) pairs."""
    L, d, hid, kv, V = h["n_layers"], h["dim"], h["hidden"], h["kv_dim"], h["vocab"]
    half_head = d // h["n_heads"] // 2
    shapes = [
        ("tok_embeddings", (V, d)),
        ("attention_norm", (L, d)),
        ("wq", (L, d, d)),
        ("wk", (L, kv, d)),
        ("wv", (L, kv, d)),
        ("wo", (L, d, d)),
        ("ffn_norm", (L, d)),
        ("w1", (L, hid, d)),
        ("w2", (L, d, hid)),
        ("w3", (L, hid, d)),
        ("norm", (d,)),
        ("freq_cis_real", (h["seq_len"], half_head)),   # skipped: RoPE is recomputed
        ("freq_cis_imag", (h["seq_len"], half_head)),   # by every engine
    ]
    if not h["shared"]:
        shapes.append(("output", (V, d)))
    return shapes


def read_llama2c(path):
    """Read header and weights; check the file size before reading any array."""
    h = read_header(path)
    shapes = array_shapes(h)
    expected = HEADER_BYTES + FLOAT_BYTES * sum(int(np.prod(s)) for _, s in shapes)
    actual = os.path.getsize(path)
    if actual < expected:
        raise ConversionError(f"{path}: truncated: header implies {expected} bytes, file has {actual}")
    if actual > expected:
        raise ConversionError(f"{path}: {actual - expected} unexpected trailing bytes (expected {expected})")
    flat = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)
    weights, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        weights[name] = flat[pos:pos + n].reshape(shape)
        pos += n
    return h, weights


def interleaved_to_halves(w, n_heads):
    """Reorder the rows of a q or k projection (n_heads*head_size, in) per head.

    llama2.c row 2*i + j of a head (pair i, component j) becomes HF row
    j*half + i, i.e. all "first" components, then all "second" components.
    """
    out_features, in_features = w.shape
    half = out_features // n_heads // 2
    return (w.reshape(n_heads, half, 2, in_features)    # (head, pair i, component j, in)
             .transpose(0, 2, 1, 3)                     # (head, component j, pair i, in)
             .reshape(out_features, in_features))


def hf_config(h):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h["dim"],
        "intermediate_size": h["hidden"],
        "num_hidden_layers": h["n_layers"],
        "num_attention_heads": h["n_heads"],
        "num_key_value_heads": h["n_kv_heads"],
        "vocab_size": h["vocab"],
        "max_position_embeddings": h["seq_len"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": h["shared"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def convert(bin_path, out_dir):
    """Convert ``bin_path`` (llama2.c) into an HF Llama directory ``out_dir``.

    Refuses to write into an existing non-empty directory.  Returns the config dict.
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"{out_dir}: output directory exists and is not empty")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"{out_dir}: exists and is not a directory")
    h, w = read_llama2c(bin_path)

    t = {"model.embed_tokens.weight": w["tok_embeddings"]}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = w["attention_norm"][i]
        t[p + "self_attn.q_proj.weight"] = interleaved_to_halves(w["wq"][i], h["n_heads"])
        t[p + "self_attn.k_proj.weight"] = interleaved_to_halves(w["wk"][i], h["n_kv_heads"])
        t[p + "self_attn.v_proj.weight"] = w["wv"][i]
        t[p + "self_attn.o_proj.weight"] = w["wo"][i]
        t[p + "post_attention_layernorm.weight"] = w["ffn_norm"][i]
        t[p + "mlp.gate_proj.weight"] = w["w1"][i]
        t[p + "mlp.down_proj.weight"] = w["w2"][i]
        t[p + "mlp.up_proj.weight"] = w["w3"][i]
    t["model.norm.weight"] = w["norm"]
    if not h["shared"]:
        t["lm_head.weight"] = w["output"]
    # safetensors wants contiguous arrays; float32 is kept exactly as stored.
    t = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}

    config = hf_config(h)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(t, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python tools/llama2c_to_hf.py IN.bin OUT_DIR", file=sys.stderr)
        return 2
    try:
        config = convert(argv[0], argv[1])
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {argv[1]}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"vocab {config['vocab_size']}, tied={config['tie_word_embeddings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

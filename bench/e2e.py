"""End-to-end speed: decode and prefill tokens/s of a LLaMA-3-8B-shaped model, bf16 vs aq W4A16 vs aq W4A4.

    python bench/e2e.py --out bench/results/e2e            # on the GPU (writes e2e.md and e2e.json)
    python bench/e2e.py --check                            # CPU: the harness against HF's forward on a tiny model

The model has LLaMA-3-8B's shapes (32 layers, d 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256) with random
bf16 weights built on the GPU. Quantized variants go through aq.patch_model (round-to-nearest): W4A16 with groups of
128 (lm_head and embeddings in bf16, as patch_model's default; one more row with both quantized too), and W4A4
(per-channel weights, per-token activations, norms fused into the activation quantization).

Harness: a static KV cache and one CUDA graph per (phase, batch), so launch overhead does not hide the kernels. The
forward is written here against the model's own modules (embedding, norms, q/k/v/o, MLP, lm_head: whatever patch_model
put there), with F.scaled_dot_product_attention, HF's rotary embedding, and logits for the last position only.
- decode: one token per sequence at position P (the prompt length), attention over the masked static cache of
  P + 128 slots; tokens/s = batch / step time (median of replays).
- prefill: P tokens per sequence, causal, K/V written to the cache; tokens/s = batch * P / time.
Peak memory: torch.cuda.max_memory_allocated over a variant's runs (weights + cache + activations + graph pools).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F


from aq.config import QuantConfig
from aq.patch import patch_model, patched_summary, weight_bytes
from bench.timing import graph_time

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192})


def build_model(layers: int, device, dtype=torch.bfloat16, **over):
    """Random-weight LLaMA with LLaMA-3-8B's shapes, allocated directly on `device` (no CPU copy, no HF init)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    cfg = dict(LLAMA3_8B, num_hidden_layers=layers)
    cfg.update(over)
    config = LlamaConfig(**cfg)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate the weights in dtype at once (8B in fp32 first would be 32 GB)
    try:
        with no_init_weights(), torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


class Harness:
    """Static-cache forward of a LLaMA model through its own (possibly patched) modules."""

    def __init__(self, model, batch: int, max_len: int):
        self.m = model
        c = model.config
        self.B, self.L = batch, max_len
        self.H, self.KV = c.num_attention_heads, c.num_key_value_heads
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        dev = next(model.parameters()).device
        dt = model.model.norm.weight.dtype
        shape = (batch, self.KV, max_len, self.hd)
        self.k = [torch.zeros(shape, device=dev, dtype=dt) for _ in model.model.layers]
        self.v = [torch.zeros(shape, device=dev, dtype=dt) for _ in model.model.layers]
        self.dev = dev

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, decode: bool) -> torch.Tensor:
        """ids [B, T]; pos [T] absolute positions (decode: T = 1, attention over the masked cache)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = self.m.model
        B, T = ids.shape
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, pos[None, :].expand(B, T))
        if decode:
            mask = (torch.arange(self.L, device=self.dev) <= pos[0])[None, None, None, :]
        for i, lay in enumerate(m.layers):
            r = h
            x = lay.input_layernorm(h)
            at = lay.self_attn
            q = at.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)
            k = at.k_proj(x).view(B, T, self.KV, self.hd).transpose(1, 2)
            v = at.v_proj(x).view(B, T, self.KV, self.hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v)
            rep = self.H // self.KV
            if decode:  # the rep query heads of a KV group become rep query rows against that group's cache
                qg = q.reshape(B, self.KV, rep, self.hd)
                a = F.scaled_dot_product_attention(qg, self.k[i], self.v[i], attn_mask=mask)
                a = a.reshape(B, self.H, 1, self.hd)
            else:  # prefill from position 0: causal attention over the new tokens
                a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                   is_causal=True)
            h = r + at.o_proj(a.transpose(1, 2).reshape(B, T, self.H * self.hd))
            r = h
            x = lay.post_attention_layernorm(h)
            mlp = lay.mlp
            h = r + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        h = m.norm(h[:, -1:])
        return self.m.lm_head(h).float()


@torch.no_grad()
def linears_only(model, B: int):
    """Every linear of a decode step (q, k, v, o, gate, up, down per layer, then lm_head) on one token per sequence,
    nothing else: the decode step's GEMM time."""
    c = model.config
    dev = next(model.parameters()).device
    dt = model.model.norm.weight.dtype
    key = (B, str(dev))
    if getattr(linears_only, "_key", None) != key:
        linears_only._x = torch.randn(B, 1, c.hidden_size, device=dev, dtype=dt)
        linears_only._xi = torch.randn(B, 1, c.intermediate_size, device=dev, dtype=dt)
        linears_only._key = key
    x, xi = linears_only._x, linears_only._xi
    for lay in model.model.layers:
        at, mlp = lay.self_attn, lay.mlp
        at.q_proj(x), at.k_proj(x), at.v_proj(x), at.o_proj(x)
        mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj(xi)
    return model.lm_head(x[:, -1:])


def timed_graph(fn, reps: int) -> float:
    """Median replay time in ms of fn captured in a CUDA graph."""
    return graph_time([fn], reps) / 1e3


def run_variant(model, batches, prompt: int, gen: int, reps: int) -> dict:
    out = {}
    for B in batches:
        h = Harness(model, B, prompt + gen)
        ids = torch.randint(0, model.config.vocab_size, (B, prompt), device=h.dev)
        pos_p = torch.arange(prompt, device=h.dev)
        tok = torch.randint(0, model.config.vocab_size, (B, 1), device=h.dev)
        pos_d = torch.tensor([prompt], device=h.dev)
        t_pre = timed_graph(lambda: h.forward(ids, pos_p, decode=False), max(3, reps // 5))
        t_dec = timed_graph(lambda: h.forward(tok, pos_d, decode=True), reps)
        logits = h.forward(tok, pos_d, decode=True)
        t_lin = timed_graph(lambda: linears_only(model, B), reps)
        out[B] = dict(prefill_ms=t_pre, prefill_tok_s=B * prompt / t_pre * 1e3, decode_ms=t_dec,
                      decode_tok_s=B / t_dec * 1e3, decode_linears_ms=t_lin, finite=bool(torch.isfinite(logits).all()))
        print(f"  batch {B}: prefill {t_pre:.2f} ms ({out[B]['prefill_tok_s']:.0f} tok/s), "
              f"decode {t_dec:.3f} ms ({out[B]['decode_tok_s']:.1f} tok/s), of which linears {t_lin:.3f} ms",
              flush=True)
        h = None  # free this batch's cache before the next
        gc.collect()
        torch.cuda.empty_cache()
    return out


def bench(args) -> dict:
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "date": str(datetime.date.today()), "torch": torch.__version__,
           "layers": args.layers, "prompt": args.prompt, "gen": args.gen, "batches": args.batches,
           "group_size": args.group_size, "variants": {}}
    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        t0 = time.time()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model = build_model(args.layers, dev)
            if name == "w4a16":
                patch_model(model, QuantConfig(wbits=4, abits=16, group_size=args.group_size))
            elif name == "w4a16-head":
                patch_model(model, QuantConfig(wbits=4, abits=16, group_size=args.group_size), lm_head=True,
                            embeddings=True)
            elif name == "w4a4":
                patch_model(model, QuantConfig(wbits=4, abits=4, group_size=None))
            elif name == "bf16-aqnorm":  # the bf16 model with aq's one-kernel norms: isolates the linears' share
                from aq.deploy import FusedNorm
                norms = [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
                for n in norms:
                    parent, _, child = n.rpartition(".")
                    model.get_submodule(parent).register_module(child, FusedNorm(model.get_submodule(n)))
            elif name != "bf16":
                raise ValueError(f"unknown variant {name}")
            gc.collect()
            torch.cuda.empty_cache()
            wb = weight_bytes(model)
            torch.cuda.reset_peak_memory_stats()
            print(f"{name}: built in {time.time() - t0:.1f}s, weights {wb / 2**30:.2f} GiB, "
                  f"{patched_summary(model)}", flush=True)
            r = run_variant(model, args.batches, args.prompt, args.gen, args.reps)
            res["variants"][name] = dict(weight_bytes=wb, peak_bytes=torch.cuda.max_memory_allocated(),
                                         runs={str(k): v for k, v in r.items()}, seconds=time.time() - t0)
        except Exception as e:  # keep the other variants' numbers
            traceback.print_exc()
            res["variants"][name] = dict(error=f"{type(e).__name__}: {e}")
        finally:
            model = None
            gc.collect()
            torch.cuda.empty_cache()
        if args.out:  # after every variant, so that a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    return res


LABEL = {"bf16": "bf16 (torch)", "bf16-aqnorm": "bf16 + aq norm kernel", "w4a16": "aq W4A16 g128",
         "w4a16-head": "aq W4A16 g128 + lm_head/embed 4-bit",
         "w4a4": "aq W4A4 (per-channel W, per-token A)"}


def table(res: dict) -> str:
    v = res["variants"]
    base = v.get("bf16", {})
    lines = [f"# End-to-end speed, LLaMA-3-8B shapes ({res['layers']} layers, random bf16 weights)", "",
             f"{res['gpu']}, {res['date']}, torch {res['torch']}; static KV cache, CUDA graphs; prompt {res['prompt']} "
             f"tokens, decode at position {res['prompt']} over a {res['prompt'] + res['gen']}-slot cache; "
             "median of graph replays. Speed-ups vs bf16 in parentheses.", "",
             "| model | weights GiB (x bf16) | peak GiB | " + " | ".join(
                 f"decode b{b} tok/s | decode b{b} ms (linears) | prefill b{b} tok/s" for b in res["batches"]) + " |",
             "|---|---|---|" + "---|---|---|" * len(res["batches"])]
    for name, r in v.items():
        if "error" in r:
            lines.append(f"| {LABEL.get(name, name)} | failed: {r['error'][:120]} |")
            continue
        cells = [LABEL.get(name, name)]
        ratio = r["weight_bytes"] / base["weight_bytes"] if "weight_bytes" in base else float("nan")
        cells += [f"{r['weight_bytes'] / 2**30:.2f} ({ratio:.2f}x)", f"{r['peak_bytes'] / 2**30:.2f}"]
        for b in res["batches"]:
            x = r["runs"][str(b)]
            bb = base.get("runs", {}).get(str(b))
            sd = f" ({x['decode_tok_s'] / bb['decode_tok_s']:.2f}x)" if bb else ""
            sp = f" ({x['prefill_tok_s'] / bb['prefill_tok_s']:.2f}x)" if bb else ""
            cells += [f"{x['decode_tok_s']:.1f}{sd}", f"{x['decode_ms']:.2f} ({x.get('decode_linears_ms', 0):.2f})",
                      f"{x['prefill_tok_s']:.0f}{sp}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_on_cpu() -> None:
    """The harness reproduces HF's forward (last-position logits) on a tiny model, FP and patched."""
    import copy

    torch.manual_seed(0)
    model = build_model(2, "cpu", torch.float32, vocab_size=256, hidden_size=128, intermediate_size=256,
                        num_attention_heads=4, num_key_value_heads=2, rope_scaling=None)
    for name, m in (("fp", model), ("w4a4", patch_model(copy.deepcopy(model), QuantConfig(4, 4, None)))):
        ids = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            ref = m(ids).logits
        h = Harness(m, 2, 16)
        pre = h.forward(ids, torch.arange(12), decode=False)
        dec = h.forward(ids[:, 11:12], torch.tensor([11]), decode=True)  # re-decode the last token from the cache
        e1 = (pre[:, 0] - ref[:, -1]).abs().max().item()
        e2 = (dec[:, 0] - ref[:, -1]).abs().max().item()
        print(f"{name}: prefill vs HF {e1:.2e}, decode vs HF {e2:.2e}")
        assert e1 < 1e-4 and e2 < 1e-4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = LLaMA-3-8B; the headline)")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens per sequence")
    ap.add_argument("--gen", type=int, default=128, help="cache slots after the prompt")
    ap.add_argument("--reps", type=int, default=30, help="decode graph replays timed (prefill: a fifth)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--variants", default="bf16,w4a16,w4a4,bf16-aqnorm,w4a16-head")
    ap.add_argument("--out", type=Path, default=None, help="path without suffix: writes .md and .json")
    ap.add_argument("--check", action="store_true", help="CPU self-check of the harness, then exit")
    args = ap.parse_args()
    if args.check:
        check_on_cpu()
        return
    res = bench(args)
    t = table(res)
    print(t)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        args.out.with_suffix(".md").write_text(t + "\n")


if __name__ == "__main__":
    main()

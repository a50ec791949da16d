#!/usr/bin/env python
"""Name every feature of a tiny-CLIP SAE end to end on the GPU path, and print its timings (issue 8, item 5).

    python scripts/gpu_name_tiny_clip.py                          # CUDA: the device machine runs it as is
    python scripts/gpu_name_tiny_clip.py --device cpu --tiny      # the CPU smoke run (tests/test_naming_generated.py)

Everything is built from configs with random weights, offline (no Hub): a tiny open_clip ViT, a random TopK SAE on
its last block, a tiny Stable Diffusion pipeline (UNet + VAE + CLIP text encoder, saved and loaded back through
`DiffusersGenerator`), and a tiny Llama chat LM (word-level tokenizer, loaded through `TransformersChatProposer`,
several features per call). The controls are scikit-image's bundled photos. The names mean nothing (random
networks); the point is that the engine's GPU path runs end to end on CUDA and how fast each part is: renders/s
(the diffusers pipeline, batched across prompts), encode/s (backbone + SAE + token max), proposer calls/s, total.
Output: the timings on stdout and `<work-dir>/summary.json` (the engine's summary).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline: nothing below may reach the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the two sizes: "tiny" runs in seconds on a CPU; "gpu" gives the device enough work to measure throughput
SIZES = {
    "tiny": dict(clip_image=32, clip_patch=16, clip_width=32, clip_layers=1, d_sae=16, k=3, sd_size=16,
                 sd_channels=(8, 16), sd_text=8, lm_hidden=32, lm_layers=2, gen_batch=8, encode_batch=32, chunk=32,
                 n_controls=6, n_seed_prompts=4, n_images=2, n_eval_images=3, n_rounds=1, n_proposals=2, n_best=3,
                 n_select=2, features_per_call=4, max_new_tokens=8, steps=1),
    "gpu": dict(clip_image=64, clip_patch=8, clip_width=128, clip_layers=4, d_sae=256, k=16, sd_size=64,
                sd_channels=(32, 64), sd_text=32, lm_hidden=64, lm_layers=2, gen_batch=64, encode_batch=256, chunk=256,
                n_controls=19, n_seed_prompts=24, n_images=4, n_eval_images=8, n_rounds=2, n_proposals=4, n_best=6,
                n_select=4, features_per_call=32, max_new_tokens=12, steps=2),
}
WORDS = ["dog", "cat", "red car", "stop sign", "tree", "house", "boat", "apple", "blue sky", "clock", "guitar", "bird",
         "horse", "coffee cup", "moon", "brick wall", "grass", "rocket", "coin", "text"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
PIECES = ["\n", "Feature", "\nFeature", " 1:", " 2:", " 3:", " 4:", "\n1.", "\n2.", "\n3.", "\n4.", " red", " blue",
          " dog", " cat", " stop", " sign", " car", " tree", " a", " on", " grass", " moon", " clock", " striped"]


def build_clip(folder: Path, s: dict, device: str):
    """A tiny open_clip ViT from a config (random weights), loaded by path like a real local checkpoint."""
    from nacosae.backbones import load_backbone

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": s["clip_image"], "layers": s["clip_layers"],
                                                      "width": s["clip_width"], "head_width": 16,
                                                      "patch_size": s["clip_patch"]},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    return load_backbone(f"open_clip:local-dir:{folder}", device=device)


def build_pipeline(folder: Path, s: dict) -> Path:
    """A tiny Stable Diffusion pipeline from configs (random weights), saved for `DiffusersGenerator` to load."""
    from nacosae.naming.tiny import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(folder, size=s["sd_size"], channels=s["sd_channels"], text_width=s["sd_text"], max_length=77)


def build_chat_lm(folder: Path, s: dict) -> Path:
    """A tiny Llama chat LM (random weights; it may write only PIECES, so its answers are lines of real words for the
    parsers) with a word-level tokenizer and a chat template, saved for `TransformersChatProposer` to load."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + PIECES)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n[^\s]*| ?[^\s]+"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=SPECIALS[4:],
                                        chat_template=CHAT_TEMPLATE)
    h = s["lm_hidden"]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=s["lm_layers"],
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    allowed = {tokenizer.convert_tokens_to_ids(p) for p in PIECES} | {tokenizer.eos_token_id}
    model.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i not in allowed]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="the smallest sizes (a CPU smoke run in seconds)")
    ap.add_argument("--work-dir", default=None, help="pool, loop state and summary.json (default: a new temp folder); "
                    "an existing one resumes")
    ap.add_argument("--d-sae", type=int, default=None, help="SAE width (default: 16 tiny, 256 gpu)")
    ap.add_argument("--features-per-call", type=int, default=None, help="features per LLM call (default: 4 tiny, 32 gpu)")
    ap.add_argument("--n-rounds", type=int, default=None, help="proposal rounds (default: 1 tiny, 2 gpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="the diffusers pipeline's dtype (default: %(default)s)")
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available on this machine: run with --device cpu (add --tiny for a quick run)")
    s = dict(SIZES["tiny" if args.tiny else "gpu"])
    if args.d_sae:
        s["d_sae"] = args.d_sae
    if args.n_rounds is not None:
        s["n_rounds"] = args.n_rounds
    if args.features_per_call:
        s["features_per_call"] = args.features_per_call
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_name_tiny_clip_"))
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models"
    torch.manual_seed(0)
    t0 = time.perf_counter()

    from nacosae.images import SkimageSource
    from nacosae.naming.engine import EngineConfig
    from nacosae.naming.generated import name_features_generated
    from nacosae.naming.generators import DiffusersGenerator
    from nacosae.naming.proposers import TransformersChatProposer
    from nacosae.sae import SAE, SAEConfig

    backbone = build_clip(models / "clip", s, args.device)
    layer = f"resblocks.{s['clip_layers'] - 1}"
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=s["clip_width"], d_sae=s["d_sae"], k=s["k"]), device=args.device)
    pipe_dir = models / "sd"
    if not (pipe_dir / "model_index.json").is_file():
        build_pipeline(pipe_dir, s)
    generator = DiffusersGenerator(pipe_dir, steps=s["steps"], guidance=0.0, size=s["sd_size"], device=args.device,
                                   dtype=args.dtype, batch_size=s["gen_batch"])
    lm_dir = models / "lm"
    if not (lm_dir / "config.json").is_file():
        build_chat_lm(lm_dir, s)
    proposer = TransformersChatProposer(lm_dir, device=args.device, max_new_tokens=s["max_new_tokens"])
    from nacosae.images import SKIMAGE_DESCRIPTIONS

    controls = SkimageSource(list(SKIMAGE_DESCRIPTIONS)[: s["n_controls"]])
    cfg = EngineConfig(n_images=s["n_images"], n_eval_images=s["n_eval_images"], n_rounds=s["n_rounds"],
                       n_proposals=s["n_proposals"], n_best=s["n_best"], n_select=s["n_select"],
                       features_per_call=s["features_per_call"])
    t_build = time.perf_counter() - t0

    out = name_features_generated(sae, backbone, layer, "all", generator, proposer, controls, work, cfg,
                                  vocabulary=WORDS, n_seed_prompts=s["n_seed_prompts"], encode_batch_size=s["encode_batch"],
                                  chunk_size=s["chunk"], progress=not args.tiny)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    sm, tp = out.summary, out.summary["throughput"]

    def rate(x):
        return f"{x:.1f}" if x is not None else "n/a"

    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
          f"size {'tiny' if args.tiny else 'gpu'}: d_sae {s['d_sae']}, layer {layer}, {s['sd_size']} px renders, "
          f"{cfg.n_rounds} rounds, {cfg.features_per_call} features per LLM call")
    print(f"features: {sm['n_features']} ({sm['n_live']} live, {sm['n_dead']} dead, {sm['n_named']} named at AUC ≥ "
          f"{cfg.threshold}); pool {sm['pool_rows']} rows, {sm['pool_bytes'] / 1e6:.2f} MB")
    print(f"renders: {tp['renders']} in {tp['render_s']:.2f} s = {rate(tp['renders_per_s'])} renders/s")
    print(f"encode: {tp['encoded']} images in {tp['encode_s']:.2f} s = {rate(tp['encoded_per_s'])} encode/s")
    print(f"proposer: {tp['proposer_calls']} calls ({tp['llm_generations']} LLM generations, {tp['llm_fallbacks']} "
          f"per-feature fallbacks) in {tp['proposer_s']:.2f} s = {rate(tp['proposer_calls_per_s'])} proposer calls/s, "
          f"{proposer.tokens_per_second:.0f} tokens/s")
    print(f"stages (s): build {t_build:.1f}, " + ", ".join(f"{k} {v}" for k, v in sm["timings_s"].items()))
    print(f"total: {total:.1f} s; summary: {work / 'summary.json'}")
    return sm


if __name__ == "__main__":
    main()

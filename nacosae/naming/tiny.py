"""Tiny random text-to-image pipelines built from configs: the real diffusers code path with no download, for the
CPU tests and the device-machine script (`scripts/gpu_name_tiny_clip.py`). Not for naming anything real.

    folder = save_tiny_sd_pipeline(tmp / "pipe", size=16)      # then DiffusersGenerator(folder, steps=1, size=16)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def tiny_clip_tokenizer(max_length: int = 16):
    """A CLIP BPE tokenizer with a byte-level character vocabulary and no merges: tokenises any prompt, offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def save_tiny_sd_pipeline(folder: str | os.PathLike, size: int = 16, channels: Sequence[int] = (8, 16), text_width: int = 8,
                          max_length: int = 16, seed: int = 0) -> Path:
    """A Stable Diffusion pipeline with random weights (UNet and VAE `channels`, a 1-layer CLIP text encoder of width
    `text_width`), `size`² px renders, saved to `folder` for `DiffusersGenerator` to load by path."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(max_length)
    ch, t = tuple(channels), text_width
    unet = UNet2DConditionModel(block_out_channels=ch, layers_per_block=1, sample_size=size // 2, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=t,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=ch, in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=t, intermediate_size=2 * t,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=max_length,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=t))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)

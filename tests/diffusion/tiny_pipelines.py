"""Tiny random-weight diffusers pipelines, built offline from diffusers' own classes with
the tiny configs of diffusers' tests (tests/pipelines/stable_diffusion, tests/pipelines/ltx),
and tokenizers made here (diffusers' tests download theirs from the Hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def clip_tokenizer(directory: Path):
    """A byte-level CLIP BPE tokenizer without merges: one token per character."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    directory.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                         model_max_length=77)


def t5_tokenizer():
    """A character-level unigram tokenizer in T5's form (</s> appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(chr(c), -1.0) for c in range(32, 127)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0), len(vocab)


def stable_diffusion(directory: Path, seed: int = 0) -> Path:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(directory.parent / f"{directory.name}-tokenizer")
    torch.manual_seed(seed)
    # Cross-attention at the third level only: the seed's 1024x768 request stays cheap.
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8, 8), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=2)
    # Four levels: 8x down, as Stable Diffusion's own VAE (so the UNet sees small latents
    # even for the seed's 1024x768 request).
    vae = AutoencoderKL(
        block_out_channels=[4, 4, 4, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, norm_num_groups=2, layers_per_block=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, hidden_size=32,
        intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
        num_hidden_layers=2, pad_token_id=1, vocab_size=len(tokenizer)))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def ltx_video(directory: Path, seed: int = 0) -> Path:
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer, vocab_size = t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
        decoder_causal=False)
    pipe = LTXPipeline(transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder,
                       tokenizer=tokenizer)
    pipe.save_pretrained(directory)
    return directory


def flux(directory: Path, seed: int = 0) -> Path:
    """FLUX.1's architecture (two text encoders, a flow-matching transformer), tiny."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = clip_tokenizer(directory.parent / f"{directory.name}-tokenizer")
    t5, t5_vocab = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=len(clip) - 2, eos_token_id=len(clip) - 1, hidden_size=32,
        intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
        pad_token_id=1, vocab_size=len(clip), hidden_act="gelu", projection_dim=32))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4),
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=text_encoder, tokenizer=clip, text_encoder_2=text_encoder_2,
                        tokenizer_2=t5, transformer=transformer)
    pipe.save_pretrained(directory)
    return directory

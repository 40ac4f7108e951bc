"""A tiny random Idefics3 (SmolVLM-architecture) checkpoint, written as a Hugging Face
directory the server can load: config.json + safetensors, preprocessor/processor configs, a
byte-level tokenizer with Idefics3's image tokens, SmolVLM's chat template."""

from __future__ import annotations

import os

import pytest
import torch

# SmolVLM's chat template (HuggingFaceTB/SmolVLM-256M-Instruct, chat_template.json)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

SPECIAL = (["<|im_start|>", "<|endoftext|>", "<fake_token_around_image>", "<image>",
            "<end_of_utterance>", "<global-img>"]
           + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])


def tiny_tokenizer():
    """A byte-level BPE without merges (256 byte tokens) plus Idefics3's special tokens."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    return tok


def tiny_idefics3(tok, seed: int = 0, tie: bool = False):
    """Vision: 32 px images in 8 px patches (16 patches, pixel-shuffled by 2 into 4 image
    tokens), 2 layers; text: a 2-layer Llama with GQA."""
    transformers = pytest.importorskip("transformers")
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rms_norm_eps=1e-5, tie_word_embeddings=tie, model_type="llama",
                pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = transformers.Idefics3Config(
        vision_config=vision, text_config=text, scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=tie,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, visible position embeddings
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or "position_embedding" in name:
                p.normal_(0, 0.1)
    return model


def write_tiny_idefics3(directory: str, seed: int = 0, tie: bool = False):
    """(the transformers model, its processor), both saved in `directory`."""
    transformers = pytest.importorskip("transformers")
    tok = tiny_tokenizer()
    model = tiny_idefics3(tok, seed, tie)
    images = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    processor = transformers.Idefics3Processor(images, tok, image_seq_len=4,
                                               chat_template=SMOLVLM_TEMPLATE)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<end_of_utterance>")
    model.generation_config.save_pretrained(directory)
    return model, processor


if __name__ == "__main__":
    import sys
    write_tiny_idefics3(sys.argv[1])
    print(sorted(os.listdir(sys.argv[1])))


CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                   "{{ message['content'] }}<end_of_utterance>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_text_model(directory: str, seed: int = 0):
    """A text-only tiny Llama chat checkpoint with the same tokenizer (to serve beside)."""
    transformers = pytest.importorskip("transformers")
    tok = tiny_tokenizer()
    tok.chat_template = CHATML_TEMPLATE
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(directory)
    tok.save_pretrained(directory)

"""The GPU workload: base-size encoders with random weights on synthetic texts shaped like IMDB.

Speed does not depend on the weights' values or the words, only on the architecture and the token
lengths, so no download is needed: the architectures are built from their configs (the published
distilbert-base-uncased and roberta-base shapes) and saved with the packaged MiniLM tokenizer
(BERT's uncased WordPiece vocabulary). Texts are whole words of that vocabulary, one word-piece
each, with lengths drawn from a log-normal whose mean is 300 word-pieces and 1 in 8 over 512, as
IMDB reviews are; labels are random (accuracy is not the point of this workload).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

# Log-normal lengths with mean 300 and P(length > 512) = 1/8: sigma solves
# ln(512/300) = z * sigma - sigma^2 / 2 with z = Phi^-1(7/8) = 1.1503 (the smaller root).
_Z = 1.1503
SIGMA = _Z - math.sqrt(_Z**2 - 2 * math.log(512 / 300))
MU = math.log(300) - SIGMA**2 / 2

ARCHITECTURES = ("distilbert", "roberta")
LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "roberta": ["query", "value"]}
# bf16 dense peak of the GPU, for model FLOPs utilisation (vendor figures, without sparsity).
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def model_config(arch: str, vocab_size: int, pad_id: int):
    import transformers as tf

    if arch == "distilbert":  # distilbert-base-uncased
        return tf.DistilBertConfig(vocab_size=vocab_size, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                                   max_position_embeddings=512, pad_token_id=pad_id)
    if arch == "roberta":  # roberta-base (vocabulary of the tokenizer used here; pad id matches it)
        return tf.RobertaConfig(vocab_size=vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072, max_position_embeddings=514 + pad_id, type_vocab_size=1,
                                layer_norm_eps=1e-5, pad_token_id=pad_id)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def build(arch: str, root: Path, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """A random-weight model directory (safetensors + tokenizer) and train / eval CSV files."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from peftlab.assets import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model_dir = root / f"{arch}-random"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(seed)
        AutoModel.from_config(model_config(arch, len(tokenizer), tokenizer.pad_token_id)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    words = np.array(sorted(w for w in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{3,}", w)))
    rng = np.random.default_rng(seed)
    files = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        lengths = np.maximum(rng.lognormal(MU, SIGMA, n).round().astype(int) - 2, 1)  # [CLS] and [SEP] count too
        texts = [" ".join(rng.choice(words, size=length)) for length in lengths]
        path = root / f"imdb-shaped-{split}-{n}.csv"
        pd.DataFrame({"text": texts, "label": rng.choice(["neg", "pos"], size=n)}).to_csv(path, index=False)
        files.append(path)
    return model_dir, files[0], files[1]


def train_flops_per_token(model_dir: Path, full: bool, mean_length: float) -> float:
    """`flops_per_token` of the model saved in `model_dir`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    return flops_per_token(layers=getattr(config, "num_hidden_layers", None) or config.n_layers,
                           hidden=getattr(config, "hidden_size", None) or config.dim,
                           ffn=getattr(config, "intermediate_size", None) or config.hidden_dim,
                           full=full, mean_length=mean_length)


def flops_per_token(layers: int, hidden: int, ffn: int, full: bool, mean_length: float) -> float:
    """Model FLOPs of one training token: 2 per weight and multiply-add forward, plus attention
    (QK^T and AV over the mean length); backward is twice the forward with weight gradients (full
    fine-tuning) and once without (frozen weights need only input gradients; adapters are tiny)."""
    weights = layers * (4 * hidden * hidden + 2 * hidden * ffn)
    forward = 2 * weights + 2 * 2 * layers * mean_length * hidden
    return forward * (3 if full else 2)


def bf16_peak(device_name: str | None) -> float | None:
    for name, peak in BF16_PEAK_FLOPS.items():
        if device_name and name in device_name:
            return peak
    return None

"""Textual inversion on SDXL (Gal et al. 2022, arXiv 2208.01618; lora.method textual_inversion).

One pseudo-word per target class is added to BOTH tokenizers; its embedding rows in both text encoders
are initialized from a coarse descriptor word (Gal et al. Sec. 4) and are the only weights that learn:
the UNet, the VAE, the rest of both encoders and every other embedding row stay frozen. The embedding
matrices carry requires_grad, so `EmbeddingGuard` keeps the frozen rows frozen exactly: it zeroes their
gradients before clipping and copies their original values back after each optimizer step (AdamW's
weight decay and the gradients of the prompt's ordinary words would otherwise move them), as diffusers'
textual_inversion_sdxl.py does.

A pseudo-word of `vectors` > 1 is the token and `<token>_1 .. _{n-1}`, diffusers' multi-vector naming,
so `pipe.load_textual_inversion(rows, token=token)` rebuilds the same tokens at generation time. The
saved file is diffusers' SDXL format: `clip_l` rows for text_encoder, `clip_g` rows for text_encoder_2.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from t2id.errors import UserError
from t2id.lora.methods import TextualInversionConfig, ti_token

FILE_KEYS = ("clip_l", "clip_g")  # diffusers' SDXL textual-inversion keys: text_encoder, text_encoder_2


def token_names(token: str, vectors: int) -> list[str]:
    """The tokens of a pseudo-word of `vectors` vectors (diffusers' multi-vector naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def expand_prompt(prompt: str, tokens: dict[str, list[str]]) -> str:
    """The prompt as the tokenizer must see it: each pseudo-word followed by its extra vectors' tokens
    (what diffusers' maybe_convert_prompt does at generation time)."""
    for names in tokens.values():
        if len(names) > 1:
            prompt = prompt.replace(names[0], " ".join(names))
    return prompt


@dataclass
class TokenSet:
    """The pseudo-words added to a pipeline: class -> token names, and their ids in each tokenizer."""

    tokens: dict[str, list[str]]
    ids: list[list[int]]  # per tokenizer (tokenizer, tokenizer_2): the ids of every token, in class order

    @property
    def flat(self) -> list[str]:
        return [t for names in self.tokens.values() for t in names]


def add_tokens(pipe, ti: TextualInversionConfig, class_names: list[str]) -> TokenSet:
    """Add every class's pseudo-word to both tokenizers and both text encoders, rows = init word's embedding."""
    tokens = {name: token_names(ti_token(ti, name), ti.vectors) for name in class_names}
    flat = [t for names in tokens.values() for t in names]
    ids = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        init = tokenizer.encode(ti.init_word, add_special_tokens=False)
        if len(init) != 1:
            raise UserError(f"lora.textual_inversion.init_word {ti.init_word!r} is {len(init)} tokens for the "
                            "CLIP tokenizer; choose a word that is one token (e.g. 'ultrasound')")
        if tokenizer.add_tokens(flat) != len(flat):
            raise UserError(f"lora.textual_inversion.token: one of {flat} is already a word of the tokenizer; "
                            "choose a rarer form, e.g. '<{slug}>'")
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
        new = tokenizer.convert_tokens_to_ids(flat)
        with torch.no_grad():
            weight = encoder.get_input_embeddings().weight
            weight[new] = weight[init[0]].clone()
        ids.append(list(new))
    return TokenSet(tokens=tokens, ids=ids)


class EmbeddingGuard:
    """Keeps every embedding row but the new tokens' exactly as it was (module doc)."""

    def __init__(self, encoders: list[torch.nn.Module], token_set: TokenSet) -> None:
        self.encoders = encoders
        self.token_set = token_set
        self.masks = []
        self.originals = []
        for encoder, ids in zip(encoders, token_set.ids):
            weight = encoder.get_input_embeddings().weight
            frozen = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            frozen[ids] = False
            self.masks.append(frozen)
            self.originals.append(weight.detach().clone())

    def weights(self) -> list[torch.nn.Parameter]:
        return [encoder.get_input_embeddings().weight for encoder in self.encoders]

    def mask_grads(self) -> None:
        for weight, frozen in zip(self.weights(), self.masks):
            if weight.grad is not None:
                weight.grad[frozen] = 0

    @torch.no_grad()
    def restore_frozen(self) -> None:
        for weight, frozen, original in zip(self.weights(), self.masks, self.originals):
            weight[frozen] = original[frozen]

    def rows(self) -> dict[str, torch.Tensor]:
        """The learnt rows in diffusers' SDXL file format ({clip_l: [T, D1], clip_g: [T, D2]}), fp32 on CPU."""
        return {key: weight.detach()[ids].float().cpu().contiguous()
                for key, weight, ids in zip(FILE_KEYS, self.weights(), self.token_set.ids)}

    @torch.no_grad()
    def load_rows(self, rows: dict[str, torch.Tensor]) -> None:
        for key, weight, ids in zip(FILE_KEYS, self.weights(), self.token_set.ids):
            weight[ids] = rows[key].to(weight.device, weight.dtype)

    def digest(self) -> str:
        digest = hashlib.sha256()
        for key, value in self.rows().items():
            digest.update(key.encode())
            digest.update(value.numpy().tobytes())
        return digest.hexdigest()


def setup_encoders(pipe, token_set: TokenSet, weight_dtype: torch.dtype, device: torch.device
                   ) -> tuple[list[torch.nn.Module], list[torch.nn.Parameter], EmbeddingGuard]:
    """Freeze both text encoders but their token-embedding matrices (fp32 master weights); (encoders,
    trainable parameters, guard)."""
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    params = []
    for encoder in encoders:
        encoder.requires_grad_(False)
        encoder.to(device=device, dtype=weight_dtype)
        weight = encoder.get_input_embeddings().weight
        weight.data = weight.data.float()
        weight.requires_grad_(True)
        params.append(weight)
    return encoders, params, EmbeddingGuard(encoders, token_set)


def class_rows(rows: dict[str, torch.Tensor], tokens: dict[str, list[str]]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a saved file's rows by class: {class: {clip_l: [vectors, D1], clip_g: [vectors, D2]}}."""
    out, start = {}, 0
    for name, names in tokens.items():
        out[name] = {key: rows[key][start:start + len(names)] for key in FILE_KEYS}
        start += len(names)
    return out

"""Prompt conditioning for the training stages: frozen-text-encoder embeddings per unique prompt, with
classifier-free-guidance dropout to the empty prompt.

Embeddings are computed once and kept when the set of unique prompts is small (a digits-sized set costs
almost nothing); past ``max_cached_prompts`` (at SD scale one embedding is 77 × 768 floats, 236 kB, so a
million prompts would not fit) only the token ids are kept and the frozen encoder runs per batch.
"""

from __future__ import annotations

MAX_CACHED_PROMPTS = 4096


class PromptConditioning:
    """``cond(prompt_index, drop, device)``: the conditioning of a batch, given each item's unique-prompt
    index and whether its prompt is dropped to ""."""

    def __init__(self, pipe, token_ids, max_cached_prompts: int = MAX_CACHED_PROMPTS):
        """``token_ids``: (P, 77) token ids of the P unique prompts."""
        import torch

        from ..generator import encode_prompts

        self.empty = encode_prompts(pipe, [""])[0].float().cpu()
        self.text_encoder = None
        if len(token_ids) <= max_cached_prompts:
            with torch.no_grad():
                self.embeddings = torch.cat([
                    pipe.text_encoder(token_ids[i:i + 256].to(pipe.device), return_dict=False)[0].float().cpu()
                    for i in range(0, len(token_ids), 256)])
        else:
            self.embeddings = None
            self.token_ids = token_ids
            self.text_encoder = pipe.text_encoder
            self.empty_ids = pipe.tokenize([""])[0]

    def cond_ids(self, ids, drop, device):
        """The conditioning of a batch given its token ids (B, 77) rather than prompt indices: the frozen
        encoder runs on them (the uncached path, for sets too large to index up front)."""
        import torch

        ids = torch.where(drop[:, None], self.empty_ids, ids)
        with torch.no_grad():
            out = self.text_encoder(ids.to(self.text_encoder.device), return_dict=False)[0].float()
        return out.to(device)

    def cond(self, prompt_index, drop, device):
        import torch

        if self.embeddings is not None:
            out = torch.where(drop[:, None, None], self.empty, self.embeddings[prompt_index])
        else:
            ids = torch.where(drop[:, None], self.empty_ids, self.token_ids[prompt_index])
            with torch.no_grad():
                out = self.text_encoder(ids.to(self.text_encoder.device), return_dict=False)[0].float()
        return out.to(device)

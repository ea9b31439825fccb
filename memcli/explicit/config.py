"""The explicit memory's model config (saved as ``memory/memory_config.json``): the ``model`` keys of ``train
router|fusion|memory`` by their own names, plus what the bank, keys and backbone decide (sizes, ids, fingerprints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from memcli.config import Anchor, EntryKey, ModelConfig, Query, Read

ANCHORS = tuple(a.value for a in Anchor)
from memcli.errors import MemcliError


@dataclass
class MemoryConfig(ModelConfig):
    LEGACY: ClassVar[dict] = {"mode": "finetuning_method"}  # the name in memory_config.json before release 3

    knowledge_num: int
    knowledge_length: int
    knowledge_dim: int
    hidden_size: int
    vocab_size: int
    pad_id: int
    memory_layers: list[int] = field(default_factory=lambda: [1, 3])
    num_candidates: int = 16
    topk_per_half: int | None = None
    gate_rank: int = 0
    fusion_rank: int = 0
    freeze_keys: bool = False
    rerank: bool = True
    retrieval: str = "product"  # product | exact (resolved from the schema's "auto" when the model is built)
    query: str = Query.token.value  # token | mean
    entry_key: str = EntryKey.embeddings.value  # embeddings | hidden
    read: str = Read.additive.value  # additive | prefix
    prefix_entries: int = 1
    # > 0: product retrieval through an index fitted to the content keys (memcli memory index), this many entries
    # re-ranked per query; 0: product keys trained with the run (build-keys)
    index_pool: int = 0
    abstain_below: float | None = None  # read=prefix: no entry read when the best one's cosine is below this
    # read=prefix: no entry read unless it shares with the question a word that at most this many entries hold
    anchor_df: int | None = None
    # with anchor_df: "subject" reads the best candidate whose recorded subject the question names (an entry with no
    # subject: the word rule); "word" the top candidate when it shares a rare word. A run that records none: word
    anchor: str = "word"
    # read=prefix: the router's scores z-fused with BM25's (lexical_weight) and a sentence encoder's (dense_weight) over
    # the question's text (memcli/retrieval); 0 leaves a scorer out (a run that records none: router alone)
    lexical_weight: float = 0.0
    dense_weight: float = 0.0
    encoder: str = "minilm"  # the sentence encoder of dense_weight: minilm, mpnet or a local directory
    prefix_separator: list[int] = field(default_factory=list)  # token ids between the prefix and the input
    # read=prefix: where the entries go in a chat-template prompt (memcli.retrieval.placement); a run that records
    # none was read before the whole template, and keeps that
    placement: str = "prefix"
    backbone: str = "tiny"
    finetuning_method: str = "full"  # frozen | lora | full
    tokenizer_fingerprint: str | None = None
    index_id: str | None = None

    def __post_init__(self):
        self.anchor_df = self.anchor_df or None  # 0 in a recipe: off

    def check(self, where: str) -> None:
        from memcli.retrieval.placement import check

        check(self.placement, f"{where}: placement")
        if self.anchor not in ANCHORS:
            raise MemcliError(f"{where}: anchor '{self.anchor}', expected one of {', '.join(ANCHORS)}")
        for k, enum in (("query", Query), ("entry_key", EntryKey), ("read", Read)):
            if getattr(self, k) not in {e.value for e in enum}:
                raise MemcliError(f"{where}: {k} '{getattr(self, k)}', expected one of "
                                  f"{', '.join(e.value for e in enum)}")

"""The retrieval core both memories use, below the memory kinds (it imports none of them).

What it works with: a **query** is the text the user asked (``placement.question_text``: the last user message
of a chat prompt, or a cloze's text) and, for a trained router, the prompt's token ids; an **entry** is a row of
text (a bank entry, a dialog turn); a **score** is a ``[queries, entries]`` tensor, ``-inf`` where an entry is
excluded (padding, removed).

- ``lexical``: BM25 over stemmed words (an index that grows one document at a time), document frequencies;
- ``encoders``: dense scorers: a sentence encoder (``minilm``, ``mpnet``, a ``train retriever`` directory) or a
  backbone's layer means;
- ``text``: ``TextIndex``, entries kept as text with their dense keys (cached by content) and BM25, searched
  exhaustively or through FAISS;
- ``fusion``: each scorer's scores z-normalised over the entries per query and summed with weights; the explicit
  memory's trained router (``memcli/explicit/gate.py``, with its product-key index) enters as one more part;
- abstention: an entry is read only when the question names its recorded subject (``lexical.names``;
  ``model.anchor=subject``), or, for an entry without one, shares a word with the question that few entries hold
  (``lexical.BM25Index.rarest_shared``; ``model.anchor_df``);
- ``placement``: where what is read is written into the prompt, for both memories.
"""

"""Models as isara uses them: the catalog and the store, and what makes a model servable and trainable.

`store` (catalog, pull, resolve a name, file or folder), `local` (a user's HF
folder or GGUF made servable and trainable, once), `derive` (the HF checkpoint
of a GGUF), `templates` (chat templates, the system prompt), `memory` (the
memory preflight), `convert` (merge, GGUF, quantize) and `verify` (a GGUF
answers like its checkpoint), used by the store and by every iteration's
export alike.
"""

"""Step 1-3 of an iteration: retrieve demos, generate instruction-free, filter.

`generate` (the phase: two stages, resumable), `prompts` (the plain Q/A format),
`retrieval` (the embedder and the USearch index), `filters` (every rejection
reason), `kinds` (answer kinds learnt from the seeds), `workers` (a run's models
on `isara worker`s).
"""

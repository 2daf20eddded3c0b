"""Step 4 of an iteration: LoRA SFT on the seeds and the accepted samples, loss on answer tokens only.

`train` (the one entry point; chooses the backend), `peft` and `unsloth` (the
two backends), `common` (encoding, loss, step plan, the adapter on disk),
`checkpoint` (mid-epoch checkpoints), `log` (train_log.csv, TensorBoard).
"""

"""What `isara export` writes: a run's model or its data, out of the run.

`model` (gguf with an Ollama Modelfile, hf, lora), `ollama` (the Modelfile's
template, from the model's chat template), `dataset` (the seeds and accepted
samples as chat, ShareGPT, Alpaca and Parquet, with a card).
"""

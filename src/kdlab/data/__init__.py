"""Data: LLM-Adapters records (load, validate, mixtures), the prompt template, tokenization
with label masks, decontamination, and the embedded arithmetic generator."""

"""Autointerp (paper A.10, Paulo et al. 2024): explain latents with an LLM and detection-score them.

examples.py   streaming collection of activating windows per latent, by activation tercile
negatives.py  MiniLM-similar and random non-activating windows
prompts.py    explainer / scorer prompts and robust parsing of their answers
constrain.py  server-enforced answer shapes (json_schema response_format, or logit_bias + stop)
client.py     OpenAI-compatible client: concurrency, timeouts, retries, on-disk cache (resumable)
server.py     a local `transformers serve` on 127.0.0.1 when no endpoint is configured
scoring.py    balanced accuracy (similar vs random negatives), per-tercile recall, summary metrics
ground_truth.py  do explanations name the planted behaviour their latent detects? (MiniLM top-1)
pipeline.py   the explain_and_score stage
"""

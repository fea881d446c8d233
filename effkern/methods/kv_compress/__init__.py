"""KV-head compression (PAPERS.md D, arXiv 2406.07056): convert a Llama-family model's KV heads into fewer shared
heads from SVDs of KV caches collected on calibration text, and measure perplexity before and after."""

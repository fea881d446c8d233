"""LAST: low-rank attention side-tuning over a frozen timm ViT (PAPERS.md A)."""

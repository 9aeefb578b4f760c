"""starlora: data-efficient LLM fine-tuning with STAR (active learning + constraint LoRA)."""

__version__ = "0.1.0"

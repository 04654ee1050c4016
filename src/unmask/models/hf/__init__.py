"""Published diffusion checkpoints (LLaDA, Dream, Fast-dLLM v2, SDAR) mapped onto unmask's Transformer."""

from unmask.models.hf.load import FAMILIES, hf_model_config, is_hf_checkpoint, load_hf

__all__ = ["FAMILIES", "hf_model_config", "is_hf_checkpoint", "load_hf"]

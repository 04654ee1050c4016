"""unmask: diffusion language models: train, decode, serve and measure them."""

__version__ = "0.1.0"

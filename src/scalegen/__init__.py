"""scalegen: scale-wise autoregressive image generation (VAR, FlexVAR, M-VAR, FlowAR) from one set of parts."""

__version__ = "0.1.0"

from .blocks import Decoder, Encoder
from .msvq import MultiScaleQuantizer, MultiScaleVQVAE, phi_table

__all__ = ["Decoder", "Encoder", "MultiScaleQuantizer", "MultiScaleVQVAE", "phi_table"]

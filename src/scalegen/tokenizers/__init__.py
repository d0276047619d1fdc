from scalegen.tokenizers.blocks import Decoder, Encoder
from scalegen.tokenizers.msvq import MultiScaleQuantizer, MultiScaleVQVAE, phi_table

__all__ = ["Decoder", "Encoder", "MultiScaleQuantizer", "MultiScaleVQVAE", "phi_table"]

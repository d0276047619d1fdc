from scalegen.heads.categorical import CategoricalHead, gumbel_soft, sample_tokens, smooth_tau, top_k_top_p_

__all__ = ["CategoricalHead", "gumbel_soft", "sample_tokens", "smooth_tau", "top_k_top_p_"]

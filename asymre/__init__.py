"""asymre: off-policy RL post-training of LLMs with Asymmetric REINFORCE."""
__version__ = "0.1.0"

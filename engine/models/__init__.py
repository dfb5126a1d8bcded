"""Our own PyTorch implementations of the supported model families, loaded from HF weights."""

from .afmoe import AfmoeForCausalLM
from .base import CausalLM
from .bloom import BloomForCausalLM
from .cohere import CohereForCausalLM
from .common import Attention
from .dbrx import DbrxForCausalLM
from .deepseek import DeepseekForCausalLM
from .falcon import FalconForCausalLM
from .falcon_h1 import FalconH1ForCausalLM
from .flint import FlintForCausalLM
from .gemma import GemmaForCausalLM
from .gemma4 import Gemma4ForCausalLM
from .gpt2 import GPT2LMHeadModel, GPTBigCodeForCausalLM
from .gpt_neo import GPTNeoForCausalLM
from .gpt_neox import GPTNeoXForCausalLM
from .gpt_oss import GptOssForCausalLM
from .granite_hybrid import GraniteHybridForCausalLM
from .jamba import JambaForCausalLM
from .kimi_linear import KimiLinearForCausalLM
from .laguna import LagunaForCausalLM
from .lfm2 import Lfm2ForCausalLM
from .llama import LlamaForCausalLM
from .llama4 import Llama4ForCausalLM
from .longcat import LongcatFlashForCausalLM
from .mamba import MambaForCausalLM
from .mimo_v2 import MiMoV2ForCausalLM
from .mpt import MptForCausalLM
from .nanochat import NanoChatForCausalLM
from .nemotron_h import NemotronHForCausalLM
from .olmo import OlmoForCausalLM
from .olmo2 import Olmo2ForCausalLM
from .olmo_hybrid import OlmoHybridForCausalLM
from .opt import BioGptForCausalLM, OPTForCausalLM, XGLMForCausalLM
from .phi import GPTJForCausalLM, PhiForCausalLM
from .phimoe import PhimoeForCausalLM
from .qwen3_5 import Qwen3_5ForCausalLM
from .stablelm import NemotronForCausalLM, PersimmonForCausalLM, StableLmForCausalLM, Starcoder2ForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "gpt_oss": GptOssForCausalLM,
    "llama4": Llama4ForCausalLM,
    "phimoe": PhimoeForCausalLM,
    "afmoe": AfmoeForCausalLM,
    "flint": FlintForCausalLM,
    "mpt": MptForCausalLM,
    "persimmon": PersimmonForCausalLM,
    "dbrx": DbrxForCausalLM,
    "nanochat": NanoChatForCausalLM,
    "olmo": OlmoForCausalLM,
    "gemma": GemmaForCausalLM,
    "gemma4": Gemma4ForCausalLM,
    "laguna": LagunaForCausalLM,
    "mimo_v2": MiMoV2ForCausalLM,
    "longcat": LongcatFlashForCausalLM,
    "kimi_linear": KimiLinearForCausalLM,
    "qwen3_5": Qwen3_5ForCausalLM,
    "lfm2": Lfm2ForCausalLM,
    "granite_hybrid": GraniteHybridForCausalLM,
    "nemotron_h": NemotronHForCausalLM,
    "mamba": MambaForCausalLM,
    "jamba": JambaForCausalLM,
    "olmo_hybrid": OlmoHybridForCausalLM,
    "falcon_h1": FalconH1ForCausalLM,
    "gpt_neox": GPTNeoXForCausalLM,
    "phi": PhiForCausalLM,
    "gptj": GPTJForCausalLM,
    "falcon": FalconForCausalLM,
    "stablelm": StableLmForCausalLM,
    "nemotron": NemotronForCausalLM,
    "cohere": CohereForCausalLM,
    "starcoder2": Starcoder2ForCausalLM,
    "olmo2": Olmo2ForCausalLM,
    "glm": LlamaForCausalLM,  # (config.py's GLM reader; the Llama layout)
    "deepseek": DeepseekForCausalLM,
    "opt": OPTForCausalLM,
    "xglm": XGLMForCausalLM,
    "biogpt": BioGptForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "gpt_bigcode": GPTBigCodeForCausalLM,
    "gpt_neo": GPTNeoForCausalLM,
    "bloom": BloomForCausalLM,
}

__all__ = ["AfmoeForCausalLM", "Attention", "CausalLM", "MODEL_CLASSES", "BioGptForCausalLM", "BloomForCausalLM",
           "CohereForCausalLM", "DbrxForCausalLM", "DeepseekForCausalLM", "FalconForCausalLM", "FlintForCausalLM",
           "GPT2LMHeadModel", "GPTBigCodeForCausalLM", "GPTJForCausalLM", "GPTNeoForCausalLM", "GemmaForCausalLM",
           "GPTNeoXForCausalLM", "GptOssForCausalLM", "KimiLinearForCausalLM", "Llama4ForCausalLM", "LlamaForCausalLM",
           "LongcatFlashForCausalLM", "MambaForCausalLM", "MiMoV2ForCausalLM", "MptForCausalLM",
           "NanoChatForCausalLM", "NemotronForCausalLM", "OPTForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
           "PersimmonForCausalLM", "PhiForCausalLM", "PhimoeForCausalLM", "StableLmForCausalLM",
           "Starcoder2ForCausalLM", "XGLMForCausalLM"]

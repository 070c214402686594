"""Import the heavy libraries once in the pytest parent so forked ranks start in a fraction of a second.

No torch compute happens here: forking after torch's thread pools started can hang the children.
"""

import megatron.core  # noqa: F401
import megatron.core.models.gpt  # noqa: F401
import megatron.core.pipeline_parallel  # noqa: F401
import modelopt.torch.peft  # noqa: F401
import peft  # noqa: F401
import transformers  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401

import megatron_peft_export  # noqa: F401
import tests.support.tiny_gpt  # noqa: F401
import tests.support.tiny_moe  # noqa: F401

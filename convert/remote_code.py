"""The modeling code that ships with the weights, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a process that never
imported this project: `torch_ref`'s two files plus `jaxllm/config.py` under the name
`customllm_config_core.py`, the one import of `jaxllm.config` rewritten into a relative import
(transformers copies relative imports of remote code along with it). Written into every directory
`convert/flax_to_torch.py` exports; `CustomLLM.save_pretrained` writes the same files (the PyTorch
trainer's `checkpoint-N` and `save_model` too). Imports no JAX (it reads `torch_ref`'s files).
"""

from __future__ import annotations

import os
import re

from convert import ConvertError
from torch_ref.modeling_customllm import CORE_MODULE, remote_code_sources

REMOTE_CODE = ("configuration_customllm.py", "modeling_customllm.py")  # torch_ref's files shipped with the weights
FILE_NAMES = (*REMOTE_CODE, f"{CORE_MODULE}.py")


def remote_code_files() -> dict[str, str]:
    """{file name: source} of the modeling code shipped with the weights
    (`torch_ref.modeling_customllm.remote_code_sources`, which `CustomLLM.save_pretrained` writes
    too), checked: raises if the sources no longer have the expected shape (exactly one import of
    the core module, no import of this project or of JAX)."""
    files = remote_code_sources()
    n = len(re.findall(rf"^from \.{CORE_MODULE} import ", files["configuration_customllm.py"], flags=re.M))
    if n != 1:
        raise ConvertError(f"torch_ref/configuration_customllm.py: expected one 'from jaxllm.config import' "
                           f"line to make relative, found {n}")
    for name, text in files.items():
        bad = re.search(r"^\s*(?:from|import)\s+(jaxllm|torch_ref|convert|jax|flax)\b", text, re.M)
        if bad:
            raise ConvertError(f"remote code {name} imports {bad.group(1)}, which an exported directory "
                               "cannot ship")
    return files


def write_remote_code(out: str) -> None:
    for name, text in remote_code_files().items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)

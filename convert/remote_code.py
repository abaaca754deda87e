"""The modeling code that ships with the weights, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a process that never
imported this project: `torch_ref`'s two files plus `jaxllm/config.py` under the name
`customllm_config_core.py`, the one import of `jaxllm.config` rewritten into a relative import
(transformers copies relative imports of remote code along with it). Written into every directory
`convert/flax_to_torch.py` exports and every directory the PyTorch trainer saves (`checkpoint-N`,
`save_model`). Imports no JAX (it reads `torch_ref`'s files through the package).
"""

from __future__ import annotations

import json
import os
import re

from convert import ConvertError

CORE_MODULE = "customllm_config_core"
AUTO_MAP = {
    "AutoConfig": "configuration_customllm.CustomLLMConfig",
    "AutoModelForCausalLM": "modeling_customllm.CustomLLM",
}
REMOTE_CODE = ("configuration_customllm.py", "modeling_customllm.py")  # torch_ref's files shipped with the weights
FILE_NAMES = (*REMOTE_CODE, f"{CORE_MODULE}.py")


def remote_code_files() -> dict[str, str]:
    """{file name: source} of the modeling code shipped with the weights, with the import of
    `jaxllm.config` made relative. Raises if the sources no longer have the expected shape
    (exactly one such import, no other import of this project or of JAX)."""
    import jaxllm.config
    import torch_ref

    ref_dir = os.path.dirname(torch_ref.__file__)
    files = {}
    for name in REMOTE_CODE:
        with open(os.path.join(ref_dir, name)) as f:
            files[name] = f.read()
    with open(jaxllm.config.__file__) as f:
        files[f"{CORE_MODULE}.py"] = f.read()
    text, n = re.subn(r"^from jaxllm\.config import ", f"from .{CORE_MODULE} import ",
                      files["configuration_customllm.py"], flags=re.M)
    if n != 1:
        raise ConvertError(f"torch_ref/configuration_customllm.py: expected one 'from jaxllm.config import' "
                           f"line to make relative, found {n}")
    files["configuration_customllm.py"] = text
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


def add_remote_code(hf_dir: str) -> None:
    """Make a saved Hugging Face directory of `CustomLLM` (`save_pretrained`: a `config.json`)
    loadable with `trust_remote_code=True` anywhere: the code files, and `auto_map` in its config."""
    write_remote_code(hf_dir)
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["auto_map"] = dict(AUTO_MAP)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)

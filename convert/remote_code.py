"""The modeling code that ships with the weights, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a process that never
imported this project: `torch_ref`'s two files plus `jaxllm/config.py` under the name
`customllm_config_core.py`, the one import of `jaxllm.config` rewritten into a relative import
(transformers copies relative imports of remote code along with it). Written into every directory
`convert/flax_to_torch.py` exports; `CustomLLM.save_pretrained` writes the same files (the PyTorch
trainer's `checkpoint-N` and `save_model` too). Imports no JAX (it reads `torch_ref`'s files).
"""

from __future__ import annotations

import ast
import os

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
    imports = {name: _imports(name, text) for name, text in files.items()}
    n = imports["configuration_customllm.py"].count((1, CORE_MODULE))
    if n != 1:
        raise ConvertError(f"torch_ref/configuration_customllm.py: expected one 'from jaxllm.config import' "
                           f"line to make relative, found {n}")
    for name, found in imports.items():
        bad = [root for level, module in found if level == 0 and (root := module.split(".")[0]) in UNSHIPPABLE]
        if bad:
            raise ConvertError(f"remote code {name} imports {bad[0]}, which an exported directory cannot ship")
    return files


UNSHIPPABLE = ("jaxllm", "torch_ref", "convert", "jax", "flax")  # what a directory's code may not import


def _imports(name: str, text: str) -> list[tuple[int, str]]:
    """(level, module) of every import statement of a source, wherever it is (in a function, after
    a `;`, among others in one `import a, b`): level 0 for an absolute import, 1 for `from .x`."""
    try:
        tree = ast.parse(text, filename=name)
    except SyntaxError as e:
        raise ConvertError(f"remote code {name} does not parse: {e.msg} (line {e.lineno})") from None
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def write_remote_code(out: str) -> None:
    for name, text in remote_code_files().items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)

"""A test's inputs are the same in every process, so that a failure reruns from its test id: seeds come from the
tests' parameters by a fixed rule (tests.helpers.seed_from), never from hash() or id(), which Python salts or
places per process."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Prints {case: sha256 of its input tensors} for a few parametrisations of the op tests, and, as a control,
# hash() of the same shapes (the old seeding rule), which must differ between the two processes.
_DIGESTS = r"""
import hashlib, json
import torch
from fastvlm_kernels.ops.verify_attention.spec import TEST_SHAPES
from tests.ops import test_verify_attention

def digest(tensors):
    sha = hashlib.sha256()
    for tensor in tensors:
        if tensor is not None:
            sha.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()

digests, control = {}, {}
for shape in TEST_SHAPES[:4]:
    for dtype in (torch.float32, torch.bfloat16):
        for salt in (0, 1):
            inputs = test_verify_attention.case_inputs(shape, dtype, salt=salt, transposed_q=salt == 1)
            digests[f"{shape} {dtype} salt={salt}"] = digest(inputs)
    control[str(shape)] = hash(shape) % 1000
print(json.dumps({"digests": digests, "control": control}))
"""


def _run_with_hash_seed(hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.pathsep.join(
        [str(TESTS.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    result = subprocess.run([sys.executable, "-c", _DIGESTS], capture_output=True, text=True, env=env,
                            cwd=TESTS.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_inputs_are_the_same_under_any_hash_seed():
    first, second = _run_with_hash_seed("1"), _run_with_hash_seed("2")
    # The control: the two processes salt str hashes differently, so hash()-based seeds would differ.
    assert first["control"] != second["control"], "PYTHONHASHSEED did not change hash(): the check proves nothing"
    assert first["digests"] == second["digests"]
    assert len(set(first["digests"].values())) == len(first["digests"]), "two cases share their inputs"


def _salted_calls(source: str, name: str) -> list:
    """Calls of the builtins hash() and id() in a file's source: values that change from process to process."""
    return [f"{name}:{node.lineno}: {node.func.id}()" for node in ast.walk(ast.parse(source, filename=name))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hash", "id")]


def test_no_test_seeds_from_hash_or_id():
    """hash() of a str (and anything holding one) and id() differ between processes: no test file calls them
    (seed with tests.helpers.seed_from). Strings, such as the subprocess's source above, are not calls."""
    assert sorted(_salted_calls("seed = hash(shape) % 1000\nkey = id(model)", "old.py")) == ["old.py:1: hash()",
                                                                                            "old.py:2: id()"]
    found = [call for path in sorted(TESTS.rglob("*.py"))
             for call in _salted_calls(path.read_text(), str(path.relative_to(TESTS.parent)))]
    assert not found, found

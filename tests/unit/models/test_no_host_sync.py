"""No host sync in the per-step code of families, losses and augmentations: a static scan.

On a GPU, `torch.tensor(...)` / `new_tensor(...)` copy host data over, and `.item()`, `.tolist()`,
`.cpu()` wait for the device; one of them in a step stalls every step. The scan (`ast`, no import)
finds every such call in models/families, models/losses and models/augment; each one must be in
ALLOWED with the reason it is not per-step work. A new call fails here until it is removed or
allowed with a reason; an allowed call that is gone fails too, so the list stays exact.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCANNED = ("models/families", "models/losses", "models/augment")
ATTRIBUTES = ("item", "tolist", "cpu", "new_tensor")   # x.item(), x.new_tensor(...), ...

# (file, function's qualified name, call) -> why it is not a per-step host sync.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("models/families/sat2ground.py", "SatelliteToGround.__init__", "torch.tensor"):
        "a buffer made once when the network is built, on the host before it is moved",
    ("models/augment/ada.py", "AdaptiveAugment.__init__", "torch.tensor"):
        "p's buffer made once when the pipeline is built",
    ("models/families/stylegan2.py", "StyleGAN2._probe", ".cpu"):
        "the linear probe (once per vision-aided stage, three per run) fits sklearn on the host",
    ("models/losses/vision_aided.py", "_matrix", ".cpu"):
        "the linear probe's features to numpy for sklearn (once per stage)",
    ("models/augment/mineaug.py", "MineAugExpansion.tags", "torch.tensor"):
        "tags from the batch's keys (host strings), made on the host and used there",
    ("models/augment/mineaug.py", "MineAugExpansion.__call__", ".cpu"):
        "the tags are host tensors already (from `tags`): a no-op that keeps row selection on the host",
}


def host_syncs(path: Path) -> list[tuple[str, str, int]]:
    """(qualified function name, call, line) of every call of ATTRIBUTES or `torch.tensor` in the file."""
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                f = child.func
                if f.attr in ATTRIBUTES:
                    found.append((".".join(scope), "." + f.attr, child.lineno))
                elif f.attr == "tensor" and isinstance(f.value, ast.Name) and f.value.id == "torch":
                    found.append((".".join(scope), "torch.tensor", child.lineno))
            visit(child, scope)

    visit(ast.parse(path.read_text(), filename=str(path)), [])
    return found


def scan() -> dict[tuple[str, str, str], list[int]]:
    out: dict[tuple[str, str, str], list[int]] = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).glob("*.py")):
            for scope, call, line in host_syncs(path):
                out.setdefault((path.relative_to(ROOT).as_posix(), scope, call), []).append(line)
    return out


def test_every_host_sync_in_step_code_is_allowed_with_a_reason():
    found = scan()
    new = [f"{f}:{lines[0]} {call} in {scope}" for (f, scope, call), lines in found.items()
           if (f, scope, call) not in ALLOWED]
    assert not new, ("host syncs in step code (make the tensor on the device, keep values as tensors, "
                     "or allow the call in ALLOWED with why it is not per-step):\n  " + "\n  ".join(new))


def test_the_allow_list_is_exact_and_every_entry_has_a_reason():
    found = scan()
    stale = [key for key in ALLOWED if key not in found]
    assert not stale, f"allowed but no longer there (remove them): {stale}"
    assert all(len(reason) > 20 for reason in ALLOWED.values())


def test_the_scan_finds_each_kind_of_call(tmp_path):
    src = tmp_path / "step.py"
    src.write_text("import torch\n"
                   "class F:\n"
                   "    def loss(self, x):\n"
                   "        a = torch.tensor([1.0], device=x.device)\n"
                   "        b = x.new_tensor(2.0)\n"
                   "        return x.sum().item(), x.tolist(), x.cpu(), torch.as_tensor(x)\n")
    assert sorted(call for _, call, _ in host_syncs(src)) == [".cpu", ".item", ".new_tensor", ".tolist",
                                                             "torch.tensor"]
    assert {scope for scope, _, _ in host_syncs(src)} == {"F.loss"}

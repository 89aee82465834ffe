"""House rules checked on the source: imports point downward, no eval/exec, safe torch.load."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "nmt"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def nmt_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nmt"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("nmt"))
    return out


def test_model_imports_no_data_or_training_code():
    for path in (SRC / "model").glob("*.py"):
        bad = {m for m in nmt_imports(path) if not (m.startswith("nmt.model") or m == "nmt.config")}
        assert not bad, f"{path.name} imports {bad}"


def test_nothing_imports_the_training_loop():
    for path in SRC.rglob("*.py"):
        if path.name in ("train.py", "cli.py"):
            continue
        assert "nmt.train" not in nmt_imports(path), f"{path} imports nmt.train"


def test_no_eval_or_exec_of_strings():
    for path in list(SRC.rglob("*.py")) + list(SCRIPTS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{path}:{node.lineno} calls {node.func.id}"


def test_every_torch_load_is_weights_only():
    for path in list(SRC.rglob("*.py")) + list(SCRIPTS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                    f"{path}:{node.lineno} torch.load without weights_only=True"

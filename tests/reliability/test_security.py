"""Safety defaults: no remote code, no pickle, no silent base-model fall-back, model outputs
are data (never code), and output paths stay inside the output directory."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.config.evaluation import load_eval_config
from kdlab.config.schema import DistillConfig, FinetuneConfig, ModelConfig
from kdlab.errors import KdlabError, ModelError
from kdlab.evaluation import get_task, list_tasks
from kdlab.evaluation.runner import evaluate
from kdlab.models.loading import load_adapter, load_model_and_tokenizer

SRC = Path(__file__).resolve().parents[2] / "src" / "kdlab"


# --------------------------------------------------------------------------- remote code


@pytest.fixture
def from_pretrained_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every AutoModel/AutoTokenizer.from_pretrained call: (class, kwargs); the real load runs."""
    import transformers

    calls: list[tuple[str, dict[str, Any]]] = []
    for name in ("AutoModelForCausalLM", "AutoTokenizer"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, dict(kwargs)))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_defaults_never_trust_remote_code() -> None:
    assert ModelConfig().trust_remote_code is False
    assert FinetuneConfig().model.trust_remote_code is False
    assert DistillConfig().student.trust_remote_code is False
    assert load_eval_config(None, []).model.trust_remote_code is False


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_from_pretrained_only_when_set(
    tiny_model_dir: Path, from_pretrained_calls, trust: bool
) -> None:
    config = ModelConfig(name_or_path=str(tiny_model_dir), trust_remote_code=trust)
    load_model_and_tokenizer(config)
    assert {name for name, _ in from_pretrained_calls} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kwargs.get("trust_remote_code") is trust for _, kwargs in from_pretrained_calls)
    model_kwargs = [kw for name, kw in from_pretrained_calls if name == "AutoModelForCausalLM"]
    assert all(kwargs.get("use_safetensors") is True for kwargs in model_kwargs)


def test_the_eval_command_does_not_trust_remote_code(
    tiny_model_dir: Path, eval_data_dir: Path, tmp_path: Path, from_pretrained_calls
) -> None:
    from kdlab.cli import main as cli_main

    code = cli_main(
        ["eval", f"model={tiny_model_dir}", "tasks=[boolq]", f"data_dir={eval_data_dir}",
         "limit=1", "backend=hf", "generation.max_new_tokens=2", f"output_dir={tmp_path / 'e'}"]
    )  # fmt: skip
    assert code == 0
    assert from_pretrained_calls
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in from_pretrained_calls)


# --------------------------------------------------------------------------- pickle


class _Payload:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture
def pickle_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with its weights in ``pytorch_model.bin`` (pickle) only."""
    from safetensors.torch import load_file

    directory = tmp_path / "pickle-model"
    shutil.copytree(tiny_model_dir, directory)
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_pickle_weights_are_refused_unless_allowed(
    pickle_model_dir: Path, tiny_model_dir: Path
) -> None:
    with pytest.raises(ModelError, match="allow_pickle"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(pickle_model_dir)))
    model, _ = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(pickle_model_dir), allow_pickle=True)
    )
    reference, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    for (name, got), (_, want) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(got, want, msg=name)


def test_a_malicious_pickle_never_runs(pickle_model_dir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    torch.save({"weights": _Payload(sentinel)}, pickle_model_dir / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(pickle_model_dir)))
    assert not sentinel.exists()


def test_a_pickle_only_adapter_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = tmp_path / "adapter"
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped.save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ModelError, match=r"adapter_model\.safetensors"):
        load_adapter(base, adapter)


# --------------------------------------------------------------------------- adapters


def test_an_adapter_for_another_base_model_is_an_error(
    tiny_model_dir: Path, foreign_adapter_dir: Path
) -> None:
    with pytest.raises(ModelError) as raised:
        load_model_and_tokenizer(
            ModelConfig(name_or_path=str(tiny_model_dir)), adapter=str(foreign_adapter_dir)
        )
    message = raised.value.one_line()
    assert str(foreign_adapter_dir) in message and "size mismatch" in message


def test_an_adapter_with_unknown_tensors_is_an_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    """PEFT only warns about adapter tensors that match no module; kdlab refuses."""
    import peft
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        adapter
    )
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 16)
    save_file(tensors, adapter / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ModelError, match="another model"):
        load_adapter(base, adapter)


# --------------------------------------------------------------------------- no code runs


def _source_calls() -> list[tuple[str, int, str, ast.Call]]:
    found = []
    for file in sorted(SRC.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                found.append(
                    (str(file.relative_to(SRC)), node.lineno, ast.unparse(node.func), node)
                )
    return found


def test_no_eval_exec_or_unsafe_deserialisation_in_src() -> None:
    banned = {
        "eval", "exec", "compile", "builtins.eval", "builtins.exec", "__import__",
        "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
        "os.system", "os.popen", "marshal.loads", "dill.load", "dill.loads",
    }  # fmt: skip
    problems = []
    for file, line, name, call in _source_calls():
        if name in banned:
            problems.append(f"{file}:{line}: {name}()")
        keywords = {k.arg: k.value for k in call.keywords}
        if name == "torch.load":
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{file}:{line}: torch.load without weights_only=True")
        shell = keywords.get("shell")
        if isinstance(shell, ast.Constant) and shell.value is True:
            problems.append(f"{file}:{line}: {name}(shell=True)")
        remote = keywords.get("trust_remote_code")
        if isinstance(remote, ast.Constant) and remote.value is True:
            problems.append(f"{file}:{line}: trust_remote_code=True hard-coded")
    assert not problems, "\n".join(problems)


CODE_OUTPUTS = [
    "__import__('pathlib').Path('{sentinel}').touch()",
    "The answer is eval(\"__import__('pathlib').Path('{sentinel}').touch()\")",
    "```python\nopen('{sentinel}', 'w').write('x')\nprint(42)\n```\nThe answer is 42.",
    "exec(compile('import os; os.system(\"touch {sentinel}\")', 'x', 'exec')) # (B) answer1",
    "{{{{__import__('os').system('touch {sentinel}')}}}} = 7 #### 7 true",
    "\\boxed{{__import__('os').system('touch {sentinel}')}} solution2 option1 ending3 (E)",
]


@pytest.mark.parametrize("template", CODE_OUTPUTS)
def test_extractors_treat_code_as_text(template: str, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    text = template.format(sentinel=sentinel)
    for name in list_tasks():
        task = get_task(name)
        answer = task.extract(text)
        if answer is not None:
            assert answer.lower() in text.lower() or task.family == "math", (name, answer)
        task.score(text, "42")
    assert not sentinel.exists()


class _CodeGenerator:
    """A 'model' whose every output is Python code that would create a file if run."""

    backend = "stub"
    tokenizer = None
    generated_tokens = 0

    def __init__(self, sentinel: Path) -> None:
        self.text = f"__import__('pathlib').Path({str(sentinel)!r}).touch() The answer is 7."

    def prompt_lengths(self, prompts):
        return [len(prompt) for prompt in prompts]

    def generate(self, prompts, *, seeds, batch_size, on_result=None):
        from kdlab.evaluation.generation import Generation

        return [Generation(self.text, "eos", 12) for _ in prompts]


def test_an_evaluation_stores_code_outputs_as_text(eval_data_dir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    out = tmp_path / "eval"
    config = load_eval_config(
        None, ["tasks=[gsm8k, boolq]", f"data_dir={eval_data_dir}", f"output_dir={out}"]
    )
    evaluate(config, generator=_CodeGenerator(sentinel))
    assert not sentinel.exists()
    first = json.loads((out / "gsm8k" / "predictions.jsonl").read_text().splitlines()[0])
    assert "__import__" in first["output"] and first["extracted"] == "7"


# --------------------------------------------------------------------------- output paths


def test_a_task_name_cannot_escape_the_output_dir(
    eval_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a registered task (no config validation) with a path-like name is refused."""
    from dataclasses import replace

    from kdlab.evaluation import tasks as tasks_module

    evil = replace(
        get_task("gsm8k"), name="../../escaped", source=str(eval_data_dir / "gsm8k" / "test.json")
    )
    monkeypatch.setitem(tasks_module._REGISTRY, "../../escaped", evil)
    out = tmp_path / "a" / "b" / "eval"
    config = load_eval_config(None, ["tasks=['../../escaped']", f"output_dir={out}"])
    with pytest.raises(KdlabError, match="escaped"):
        evaluate(config, generator=_CodeGenerator(tmp_path / "unused"))
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "a" / "escaped").exists()


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a\\b", "..", ".", "DONE", "config.yaml", "bad\x00name", "tab\there"]
)
def test_custom_task_names_must_be_plain_folder_names(name: str, tmp_path: Path) -> None:
    import yaml

    from kdlab.errors import ConfigError

    file = tmp_path / "eval.yaml"
    entry = {"name": name, "path": str(tmp_path / "t.json"), "type": "numeric"}
    file.write_text(yaml.safe_dump({"tasks": [entry], "output_dir": str(tmp_path / "out")}))
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.name"):
        load_eval_config(str(file))

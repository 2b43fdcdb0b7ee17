from __future__ import annotations

import json

import pyarrow as pa
import pytest

from actors.common.errors import InputError
from actors.prompts import PromptsConfig, QuestionExpander, candidate_seed, load_prompts


def test_generator_is_seeded_and_stable_when_growing():
    a = load_prompts(PromptsConfig(num_prompts=5, seed=1, instructions_per_prompt=2))
    b = load_prompts(PromptsConfig(num_prompts=50, seed=1, instructions_per_prompt=2))
    c = load_prompts(PromptsConfig(num_prompts=5, seed=2, instructions_per_prompt=2))
    assert a == b[:5] and a != c
    assert len({r["prompt_id"] for r in b}) == 50


def test_generated_rows_name_their_objects():
    for r in load_prompts(PromptsConfig(num_prompts=40, max_objects=3, instructions_per_prompt=3)):
        assert 1 <= len(r["gt_objects"]) <= 3 and len(r["instructions"]) == 3
        for obj in r["gt_objects"]:
            assert obj.split()[0] in r["image_prompt"]


def test_candidate_seed_depends_on_prompt_and_index_only():
    assert candidate_seed("p1", 0) == candidate_seed("p1", 0)
    assert len({candidate_seed("p1", k) for k in range(4)} | {candidate_seed("p2", 0)}) == 5


def cfg(path, **kw):
    return PromptsConfig(source="file", file=str(path), **kw)


@pytest.mark.parametrize("content,row,field,words", [
    (b"", None, None, "file is empty"),
    (b"\n  \n", None, None, "file is empty"),
    (b'{"image_prompt": "a cat"}\n\xff\xfe\n', 2, None, "not valid UTF-8"),
    (b'{"image_prompt": "a cat"}\n{"instructions": ["q"]}\n', 2, "image_prompt", "missing"),
    (b'{"image_prompt": "a cat"}\n{not json\n', 2, None, "invalid JSON"),
    (b'{"image_prompt": "a", "prompt_id": "x"}\n{"image_prompt": "b", "prompt_id": "x"}\n', 2,
     "prompt_id", "duplicate prompt_id 'x'"),
    (b'{"image_prompt": "a", "instructions": []}\n', 1, "instructions", "non-empty"),
    (b'{"image_prompt": "a", "gt_objects": "cat"}\n', 1, "gt_objects", "list of strings"),
])
def test_bad_jsonl_names_file_row_field(tmp_path, content, row, field, words):
    p = tmp_path / "p.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError) as e:
        load_prompts(cfg(p))
    msg = str(e.value)
    assert str(p) in msg and words in msg
    assert (f", row {row}," in msg or f", row {row}:" in msg) if row else ", row " not in msg
    if field:
        assert f"field '{field}'" in msg


def test_missing_prompts_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_prompts(cfg(tmp_path / "none.txt"))


def test_text_and_instruction_files(tmp_path):
    (tmp_path / "p.txt").write_text("a dog\n\na cat on a bed\n")
    (tmp_path / "i.txt").write_text("Q1\nQ2\n")
    rows = load_prompts(cfg(tmp_path / "p.txt", instructions_file=str(tmp_path / "i.txt")),
                        mentions=lambda t: [w for w in ("dog", "cat", "bed") if w in t])
    assert [r["prompt_id"] for r in rows] == ["p-0000001", "p-0000003"]
    assert [r["instructions"] for r in rows] == [["Q1"], ["Q2"]]
    assert rows[1]["gt_objects"] == ["bed", "cat"]
    (tmp_path / "i.txt").write_text("Q1\n")
    with pytest.raises(InputError, match="has 1 instructions for 2 prompts"):
        load_prompts(cfg(tmp_path / "p.txt", instructions_file=str(tmp_path / "i.txt")))


def test_jsonl_fields_and_defaults(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "a red car", "instruction": "Color?"}) + "\n")
    (row,) = load_prompts(cfg(p))
    assert row == {"prompt_id": "p-0000001", "image_prompt": "a red car", "instructions": ["Color?"],
                   "gt_objects": []}


def test_question_expander_one_row_per_instruction():
    t = pa.table({"prompt_id": ["a", "b"], "instructions": [["q1", "q2"], ["q3"]], "x": [1, 2]})
    out = QuestionExpander()(t).to_pylist()
    assert [(r["pair_key"], r["question"], r["question_index"], r["x"]) for r in out] == \
        [("a-q0", "q1", 0, 1), ("a-q1", "q2", 1, 1), ("b-q0", "q3", 0, 2)]
    assert "instructions" not in out[0]


def test_instructions_in_the_llava_format_lose_their_image_placeholder(tmp_path):
    """The authors' instruction files start each line with <image>; the answering stage adds the image itself,
    and a second placeholder made every row fail (more image tokens than images)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog on a bench\na red car\n")
    instr = tmp_path / "i.txt"
    instr.write_text("<image>\\nDescribe the image.\n<image> What color is the car?\n".replace("\\n", " "))
    rows = load_prompts(PromptsConfig(source="file", file=str(prompts), instructions_file=str(instr)))
    assert [r["instructions"] for r in rows] == [["Describe the image."], ["What color is the car?"]]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "instructions": ["<image>\\nIs there a cat?", "Describe <image> it."]}\n')
    assert load_prompts(PromptsConfig(source="file", file=str(jsonl)))[0]["instructions"] == \
        ["Is there a cat?", "Describe it."]
    instr.write_text("<image>\nWhat is it?\n")
    with pytest.raises(InputError, match=r"i.txt, row 1: the instruction holds nothing but <image>"):
        load_prompts(PromptsConfig(source="file", file=str(prompts), instructions_file=str(instr)))

"""The prompt writer stage (prompts.source llm): parsing its answers, dropping near-duplicates, topics, and the
openai backend against a real HTTP server started here (answering with fixed well-formed text built from the
request's topic)."""
from __future__ import annotations

import pytest
from chat_server import ChatServer, chat_answer

from actors.common.errors import InputError
from actors.prompt_writer import (
    PromptWriter,
    WriterConfig,
    near_duplicates,
    parse_written,
)
from actors.prompts import topic_of

GOOD = "Description: a photo of two dogs and a red bicycle in a park\nObjects: dogs, a bicycle\nQuestion: What is the dog doing?\n"


def test_parse_good_answer_canonicalises_objects(coco_vocab):
    fields, reason = parse_written("Sure!\n" + GOOD + "Objects: cat\n", coco_vocab)   # the first Objects line counts
    assert reason is None
    assert fields == {"image_prompt": "a photo of two dogs and a red bicycle in a park",
                      "question": "What is the dog doing?", "gt_objects": ["bicycle", "dog"]}
    fields, _ = parse_written("description: a tv\nOBJECTS: television and Cell Phone\nquestion: Is it on?", coco_vocab)
    assert fields["gt_objects"] == ["cell phone", "tv"]


@pytest.mark.parametrize("text, reason", [
    ("Objects: dog\nQuestion: What is it?", "missing_description"),
    ("Description: a dog\nQuestion: What is it?", "missing_objects"),
    ("Description: a dog\nObjects: dog", "missing_question"),
    ("Description: a dog\nObjects:   \nQuestion: What?", "missing_objects"),
    ("Description: a dog and a unicorn\nObjects: dog, unicorn\nQuestion: What?", "unknown_object"),
    ("complete nonsense", "missing_description"),
])
def test_parse_rejects_with_reason(coco_vocab, text, reason):
    assert parse_written(text, coco_vocab) == (None, reason)


def test_near_duplicates_keep_the_lowest_id_and_are_deterministic():
    rows = [{"prompt_id": "p3", "image_prompt": "A photo of a dog in a park."},
            {"prompt_id": "p1", "image_prompt": "a photo of a dog in a park"},            # exact word set of p3
            {"prompt_id": "p2", "image_prompt": "a cat on a red table in a kitchen"},
            {"prompt_id": "p4", "image_prompt": "a photo of a big dog in a park"},        # 6/7 words shared with p1
            {"prompt_id": "p5", "image_prompt": "three bikes on a beach"}]
    assert near_duplicates(rows, 0.8) == {"p3", "p4"}
    assert near_duplicates(list(reversed(rows)), 0.8) == {"p3", "p4"}   # input order does not matter
    assert near_duplicates(rows, 1.0) == {"p3"}                          # exact word-set repeats only
    # a chain a~b, b~c with a !~ c: b goes (near the kept a), so c is compared with a only and stays
    chain = [{"prompt_id": "a", "image_prompt": "w1 w2 w3 w4 w5 w6 w7 w8"},
             {"prompt_id": "b", "image_prompt": "w1 w2 w3 w4 w5 w6 w7 w9"},
             {"prompt_id": "c", "image_prompt": "w1 w2 w3 w4 w5 w6 w10 w9"}]
    assert near_duplicates(chain, 0.7) == {"b"}


def test_topics_are_seeded_per_index():
    a = [topic_of(0, "", i, 3, None) for i in range(20)]
    assert a == [topic_of(0, "", i, 3, None) for i in range(20)]
    assert a != [topic_of(1, "", i, 3, None) for i in range(20)]
    assert a[:5] == [topic_of(0, "", i, 3, None) for i in range(5)]   # growing the count keeps the first ones
    assert all(1 <= len(t.split(",")) <= 3 for t in a)
    assert {topic_of(0, "", i, 3, ["cats", "boats"]) for i in range(20)} == {"cats", "boats"}


def test_writer_config_problems():
    assert [p.key for p in WriterConfig().validate()] == ["prompts.writer.model"]
    assert [p.key for p in WriterConfig(model="m", backend="openai").validate()] == ["prompts.writer.api_base"]
    assert [p.key for p in WriterConfig(model="m", dedup_threshold=0).validate()] == ["prompts.writer.dedup_threshold"]


def written(body) -> tuple[int, dict]:
    """The topic's objects as three well-formed lines."""
    topic = body["messages"][0]["content"].split("Topic: ", 1)[1].split("\n", 1)[0]
    objects = topic.rsplit(" in ", 1)[0].rsplit(" on ", 1)[0].rsplit(" at ", 1)[0]
    return 200, chat_answer(f"Description: a photo of {topic}\nObjects: {objects}\nQuestion: What is in the image?")


def test_openai_backend_against_a_real_server(coco_vocab, monkeypatch):
    import pyarrow as pa
    server = ChatServer(written)
    monkeypatch.setenv("WRITER_KEY", "sk-test")
    try:
        writer = PromptWriter(WriterConfig(backend="openai", model="writer-x", api_base=server.url + "/v1",
                                           api_key_env="WRITER_KEY", temperature=0.5, max_new_tokens=40))
        topics = [topic_of(0, "", i, 3, None) for i in range(4)]
        out = writer(pa.table({"prompt_id": [f"l0-{i}" for i in range(4)], "topic": topics}))
    finally:
        server.close()
    assert out.column_names == ["prompt_id", "topic", "text"]
    assert len(server.requests) == 4
    first = server.requests[0]
    assert (first["path"], first["auth"], first["model"], first["temperature"], first["max_tokens"]) == (
        "/v1/chat/completions", "Bearer sk-test", "writer-x", 0.5, 40)
    assert len({r["seed"] for r in server.requests}) == 4   # sampling seeded per row
    for topic, text in zip(topics, out.column("text").to_pylist()):
        fields, reason = parse_written(text, coco_vocab)
        assert reason is None
        assert fields["gt_objects"] == sorted(coco_vocab.canonical(o.strip()) for o in topic.split(" in ")[0]
                                              .split(" on ")[0].split(" at ")[0].split(","))


def test_openai_backend_refusal_is_one_line():
    server = ChatServer(lambda body: (401, {"error": {"message": "bad key"}}))
    try:
        writer = PromptWriter(WriterConfig(backend="openai", model="m", api_base=server.url + "/v1/chat/completions"))
        with pytest.raises(InputError, match="refused the request \\(HTTP 401") as e:
            writer.write("l0-0", "dog in a park")
    finally:
        server.close()
    assert "\n" not in str(e.value) and "prompts.writer" in str(e.value)
    assert len(server.requests) == 1   # a refusal is not retried

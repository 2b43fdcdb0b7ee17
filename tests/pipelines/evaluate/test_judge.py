"""MMHal-Bench judges: an OpenAI-compatible endpoint served inside the test, and a local causal LM;
`eval mmhal` end to end with the tiny LLaVA answering real photos."""
from __future__ import annotations

import json
import time

import pytest
from chat_server import ChatServer, chat_answer

from actors.common.errors import InputError
from pipelines.evaluate.judge import (
    HttpJudge,
    check_mmhal_inputs,
    make_judge,
    review_items,
)
from pipelines.evaluate.mmhal import build_judge_prompt, mmhal_metrics, score_reviews

# (file written, image_src, image_id, question_type, question, image_content, gt_answer, rating the judge gives)
ITEMS = [
    ("chelsea.png", "https://example.org/img/chelsea.png", "id-chelsea", "attribute",
     "What animal is in the picture?", ["Cat"], "A tabby cat.", 5),
    ("astronaut.png", "https://example.org/img/astronaut.png", "id-astro", "holistic",
     "Describe this image.", ["Person", "Flag"], "An astronaut in a space suit.", 4),
    # found by image_id: image_src's file name is not in the folder
    ("coffee.jpg", "https://example.org/img/other_o.jpg", "coffee", "attribute",
     "What is in the cup?", ["Cup", "Coffee"], "Coffee.", 1),
    ("rocket.png", "https://example.org/img/rocket.png", "id-rocket", "counting",
     "How many rockets are there?", ["Rocket"], "One rocket.", 2),
]
RATINGS = {q: r for *_, q, _, _, r in ITEMS}
PHOTOS = {"chelsea.png": "chelsea", "astronaut.png": "astronaut", "coffee.jpg": "coffee", "rocket.png": "rocket"}


@pytest.fixture(scope="module")
def mmhal_set(tmp_path_factory):
    import skimage.data as skdata  # the [test] extra requires scikit-image
    from PIL import Image
    root = tmp_path_factory.mktemp("mmhal")
    (root / "images").mkdir()
    for name, fn in PHOTOS.items():
        Image.fromarray(getattr(skdata, fn)()).convert("RGB").save(root / "images" / name)
    items = [{"question_type": t, "question_topic": "test", "image_id": iid, "image_src": src,
              "image_content": content, "question": q, "gt_answer": gt, "model_answer": ""}
             for _, src, iid, t, q, content, gt, _ in ITEMS]
    (root / "template.json").write_text(json.dumps(items))
    return root


class JudgeServer(ChatServer):
    """Rates by the question in the prompt; `fail` requests first answer 503, mode "401" refuses, "slow" waits."""

    def __init__(self):
        self.fail, self.mode = 0, "ok"
        super().__init__(self.reply)

    def reply(self, body):
        if self.fail > 0:
            self.fail -= 1
            return 503, {"error": "overloaded"}
        if self.mode == "401":
            return 401, {"error": {"message": "bad key"}}
        if self.mode == "slow":
            time.sleep(1.0)
        prompt = body["messages"][0]["content"]
        question = prompt.split("### Question\n", 1)[1].split("\n", 1)[0]
        return 200, chat_answer(f"The response is plausible.\nRating: {RATINGS.get(question, 0)}")


@pytest.fixture
def judge_server():
    server = JudgeServer()
    yield server
    server.close()


def test_eval_mmhal_with_http_judge(mmhal_set, judge_server, tiny_models, ray_local, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main
    monkeypatch.setenv("TEST_JUDGE_KEY", "sekrit")
    rc = main(["eval", "mmhal", "--template", str(mmhal_set / "template.json"), "--image-dir",
               str(mmhal_set / "images"), "--model", str(tiny_models["llava"]), "--judge", judge_server.url + "/v1",
               "--judge-model", "judge-x", "--judge-key-env", "TEST_JUDGE_KEY", "--max-new-tokens", "8",
               "--out", str(tmp_path / "out"), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["score"] == pytest.approx(3.0)          # (5 + 4 + 1 + 2) / 4
    assert result["hallucination_rate"] == pytest.approx(0.5)                  # ratings 1 and 2 are < 3
    assert result["per_type"] == {"attribute": 3.0, "holistic": 4.0, "counting": 2.0}
    assert result["unrated"] == 0 and result["unanswered"] == 0
    reqs = judge_server.requests
    assert len(reqs) == 4 and {r["path"] for r in reqs} == {"/v1/chat/completions"}
    assert {r["auth"] for r in reqs} == {"Bearer sekrit"} and {r["model"] for r in reqs} == {"judge-x"}
    assert {r["temperature"] for r in reqs} == {0.0}
    reviewed = json.loads((tmp_path / "out" / "mmhal_reviews.json").read_text())
    assert [r["question"] for r in reviewed] == [i[4] for i in ITEMS]
    assert all(r["model_answer"].strip() for r in reviewed)                    # the tiny LLaVA answered
    assert [r["rating"] for r in reviewed] == [i[7] for i in ITEMS]
    # The judge saw the official prompt carrying exactly the answers written to the file.
    assert sorted(r["messages"][0]["content"] for r in reqs) == sorted(build_judge_prompt(r) for r in reviewed)
    # The written file re-scores to the same numbers with `eval mmhal-score`.
    rescored = score_reviews(tmp_path / "out" / "mmhal_reviews.json")
    assert rescored == {k: result[k] for k in ("n", "score", "hallucination_rate", "per_type")}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["score"] == pytest.approx(3.0)


def prompt_for(question: str) -> str:
    return build_judge_prompt({"image_content": ["Cat"], "question": question, "gt_answer": "x",
                               "model_answer": "y"})


def test_http_judge_retries_then_answers(judge_server):
    judge_server.fail = 2
    judge = HttpJudge(judge_server.url, retries=3, backoff=0.01)
    assert judge([prompt_for("What animal is in the picture?")]) == ["The response is plausible.\nRating: 5"]
    assert len(judge_server.requests) == 3
    assert judge_server.requests[0]["auth"] is None                            # no key: no header


def test_http_judge_gives_up_after_bounded_retries(judge_server):
    judge_server.fail = 100
    with pytest.raises(InputError, match=r"failed 3 times, last: HTTP 503"):
        HttpJudge(judge_server.url, retries=2, backoff=0.01)([prompt_for("q")])
    assert len(judge_server.requests) == 3


def test_http_judge_does_not_retry_auth_errors(judge_server):
    judge_server.mode = "401"
    with pytest.raises(InputError, match=r"refused the request \(HTTP 401.*bad key"):
        HttpJudge(judge_server.url, retries=3, backoff=0.01)([prompt_for("q")])
    assert len(judge_server.requests) == 1


def test_http_judge_times_out(judge_server):
    judge_server.mode = "slow"
    with pytest.raises(InputError, match=r"failed 2 times, last: .*timed out"):
        HttpJudge(judge_server.url, retries=1, backoff=0.01, timeout=0.2)([prompt_for("q")])


def test_judge_url_forms():
    for base in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/chat/completions"):
        assert HttpJudge(base).url == "http://h:1/v1/chat/completions"


@pytest.fixture(scope="module")
def stuck_judge(tmp_path_factory):
    """A tiny LlamaForCausalLM whose every next token is "Rating: 4" (one added token): the hidden state is
    the same constant for every input (equal embeddings, attention and MLP outputs zeroed) and only that
    token's lm_head row is non-zero. Loaded back through the ordinary from_pretrained path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.evaluate.mmhal import JUDGE_TEMPLATE
    from pipelines.models.tiny import LLAVA_CHAT_TEMPLATE, build_tokenizer
    tok = build_tokenizer(vocab_size=600, corpus=[JUDGE_TEMPLATE] * 2)
    tok.add_tokens(["Rating: 4"])
    tok.chat_template, tok.model_max_length = LLAVA_CHAT_TEMPLATE, 4096
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids("Rating: 4")] = 1.0
    out = tmp_path_factory.mktemp("judge-lm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_local_judge_rates_and_parses(stuck_judge):
    items = [{"question_type": t, "image_content": c, "question": q, "gt_answer": gt, "model_answer": "A cat."}
             for _, _, _, t, q, c, gt, _ in ITEMS[:3]]
    reviewed = review_items(items, make_judge(str(stuck_judge), max_new_tokens=3))
    assert [r["review"] for r in reviewed] == ["Rating: 4Rating: 4Rating: 4"] * 3
    assert [r["rating"] for r in reviewed] == [4, 4, 4]
    assert mmhal_metrics(reviewed) == {"n": 3, "score": 4.0, "hallucination_rate": 0.0,
                                       "per_type": {"attribute": 4.0, "holistic": 4.0}}
    with pytest.raises(InputError, match="does not fit the judge model's 4096-token context"):
        make_judge(str(stuck_judge), max_new_tokens=4000)([prompt_for("q")])


def test_bad_mmhal_inputs_fail_before_ray(mmhal_set, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main
    (tmp_path / "imgs").mkdir()
    for name in ("chelsea.png", "astronaut.png"):
        (tmp_path / "imgs" / name).write_bytes((mmhal_set / "images" / name).read_bytes())
    args = dict(template=mmhal_set / "template.json", adapter=None, judge="http://127.0.0.1:9", judge_key_env=None,
                model="m")
    with pytest.raises(InputError, match=r"2 image\(s\) .* missing, first: other_o.jpg \(image_id coffee\)"):
        check_mmhal_inputs(image_dir=tmp_path / "imgs", **args)
    with pytest.raises(InputError, match="judge model folder not found"):
        check_mmhal_inputs(image_dir=mmhal_set / "images", **{**args, "judge": str(tmp_path / "no-judge")})
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(InputError, match="NO_SUCH_KEY .* is not set"):
        check_mmhal_inputs(image_dir=mmhal_set / "images", **{**args, "judge_key_env": "NO_SUCH_KEY"})
    rc = main(["eval", "mmhal", "--template", str(mmhal_set / "template.json"), "--image-dir",
               str(tmp_path / "imgs"), "--model", "m", "--judge", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "2 image(s)" in err

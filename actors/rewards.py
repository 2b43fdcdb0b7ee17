"""Rewards for candidate answers: a text reward model (as ArmoRM is used), a CLIP image-answer score, and a
hallucination penalty (objects the answer mentions that the prompt did not put in the image) and an optional
coverage term (share of the image's objects the answer mentions; off by default), and an optional VLM judge
term (actors/common/judge.py: an answer's object claims checked on the image itself, not on the prompt; off by
default).

Each term is z-normalised within the candidates of one (image, question) before the weighted sum, so
terms on different scales weigh as configured and a row's reward never depends on its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from actors.common.errors import Problem
from actors.common.guard import guarded
from actors.common.judge import Judge, refuted
from actors.common.metrics import count, reward_bucket
from actors.common.runtime import (
    add_node_tag,
    device_for,
    open_png,
    setup_torch,
    torch_dtype,
    with_columns,
)

TERMS = ("text", "clip", "hallucination", "coverage", "judge")


@dataclass
class RewardsConfig:
    text_model: str = ""               # sequence-classification reward model (ArmoRM-style); "" = off
    clip_model: str = ""               # CLIP for the image-answer term; "" = off
    judge_model: str = ""              # LLaVA-family VLM that checks each claimed object on the image; "" = off
    synonyms_file: str | None = None   # object vocabulary, "class, synonym, ..." a line; default: COCO's
    # Weight of each term (text, clip, hallucination, coverage, judge) in the sum of z-scores; a missing term is 0.
    weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "clip": 0.5, "hallucination": 1.0})
    max_length: int = 1024             # tokens of question + answer the text reward model reads (truncated after)
    dtype: str = "float32"             # of the text reward model, the CLIP term and the judge
    device: str = "auto"               # auto: the actor's GPU if it has one, else CPU
    trust_remote_code: bool = False    # ArmoRM ships custom code; only set it for models you trust

    def validate(self) -> list[Problem]:
        errs = [Problem(f"rewards.weights.{k}", f"unknown term (known: {', '.join(TERMS)})") for k in self.weights
                if k not in TERMS]
        if self.weights.get("judge") and not self.judge_model:
            errs.append(Problem("rewards.judge_model", "required when weights.judge is set (a LLaVA-family model)"))
        if not (self.text_model or self.clip_model or self.judge_model or self.weights.get("hallucination")
                or self.weights.get("judge")):   # a judge weight alone is the judge_model problem above
            errs.append(Problem("rewards", "no reward term is on (set text_model, clip_model, judge_model or "
                                "weights.hallucination)"))
        return errs


def omit_default_judge(data: dict) -> None:
    """The data hash leaves rewards.judge_model out when unset, so configs without a judge hash as before it."""
    if not data.get("rewards", {}).get("judge_model", True):
        data["rewards"].pop("judge_model")


def load_vocab(cfg: RewardsConfig, prompt_source: str = "generate"):
    """The object vocabulary the hallucination reward (and CHAIR) reads answers with: the shapes world's own
    classes, a user's file, or the CHAIR reference list of COCO classes and synonyms shipped with the package."""
    from actors.common.objects import COCO_SYNONYMS, ObjectVocab
    if prompt_source == "shapes":
        from actors.common.shapes import object_vocab
        return object_vocab()
    return ObjectVocab.from_file(cfg.synonyms_file or COCO_SYNONYMS)


def znorm(values: list[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return [0.0 if math.isfinite(v) else v for v in values]
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))
    return [(v - mean) / std if std > 1e-8 else 0.0 for v in values]


def combine(terms: dict[str, list[float]], weights: dict[str, float]) -> list[float]:
    n = len(next(iter(terms.values())))
    total = [0.0] * n
    for name, values in terms.items():
        w = weights.get(name, 0.0)
        if w:
            total = [t + w * z for t, z in zip(total, znorm(values))]
    return total


def coverage(claims: list[list[str]], gt: set[str], asked: str | None) -> list[float]:
    """Share of the relevant objects each answer claims: the asked object for an existence question, all of
    the image's objects otherwise. Without it, the hallucination penalty alone prefers saying less: "No" to a
    present object and a caption naming one object would look as good as the right answers."""
    relevant = ({asked} & gt) if asked else gt
    if not relevant:
        return [0.0] * len(claims)
    return [len(relevant & set(cl)) / len(relevant) for cl in claims]


def remote_code_shims() -> None:
    """ArmoRM's modeling_custom.py imports LLAMA_INPUTS_DOCSTRING, a docstring constant transformers 5 removed
    (ImportError at load), only to decorate `forward`: an empty one lets the hub file import unchanged."""
    from transformers.models.llama import modeling_llama
    if not hasattr(modeling_llama, "LLAMA_INPUTS_DOCSTRING"):
        modeling_llama.LLAMA_INPUTS_DOCSTRING = ""


class TextReward:
    def __init__(self, cfg: RewardsConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.torch, self.cfg, self.device = torch, cfg, device_for(cfg.device)
        if cfg.trust_remote_code:
            remote_code_shims()
        self.tok = AutoTokenizer.from_pretrained(cfg.text_model, trust_remote_code=cfg.trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            cfg.text_model, dtype=torch_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
        ).to(self.device).eval()
        # ArmoRM pools the last token before the first `config.pad_token_id` (-1 wraps to the last token, so
        # right and left padding both work). A padded batch needs the tokenizer to pad with exactly that id, one
        # the embeddings hold and that is not eos; otherwise each text is scored alone, unpadded.
        tok_pad, self.model_pad = self.tok.pad_token_id, getattr(self.model.config, "pad_token_id", None)
        self.batched = (tok_pad is not None and tok_pad != self.tok.eos_token_id
                        and self.model_pad in (None, tok_pad)
                        and tok_pad < self.model.get_input_embeddings().num_embeddings)
        # Even alone, a text holding the pad id (e.g. pad = <|eot_id|>, which Llama 3's template writes after each
        # turn) would be pooled at that token: refuse such a model at load rather than score the wrong token.
        # (transformers' own classes pool the last non-pad token instead, so this is for remote code.)
        probe = self.tok(self._texts(["q"], ["a"]), add_special_tokens=False)["input_ids"][0]
        remote = not type(self.model).__module__.startswith("transformers.")
        if remote and self.model_pad is not None and self.model_pad in probe:
            raise ValueError(f"rewards.text_model: the model's pad_token_id {self.model_pad} "
                             f"({self.tok.convert_ids_to_tokens(self.model_pad)!r}) occurs in its own chat template, "
                             "so last-token pooling would read the wrong token")

    def _texts(self, questions: list[str], answers: list[str]) -> list[str]:
        chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                 for q, a in zip(questions, answers)]
        return [self.tok.apply_chat_template(c, tokenize=False) for c in chats]

    def score(self, questions: list[str], answers: list[str]) -> list[float]:
        texts = self._texts(questions, answers)
        if not self.batched:
            return [s for t in texts for s in self._scores([t])]
        return self._scores(texts)

    def _scores(self, texts: list[str]) -> list[float]:
        enc = self.tok(texts, return_tensors="pt", padding=len(texts) > 1, truncation=True,
                       max_length=self.cfg.max_length, add_special_tokens=False).to(self.device)
        with self.torch.inference_mode():
            out = self.model(**enc)
        # ArmoRM returns a preference `score`; plain reward models a single logit.
        scores = getattr(out, "score", None)
        scores = out.logits[:, 0] if scores is None else scores.reshape(len(texts), -1)[:, 0]
        return scores.float().tolist()


class RewardScorer:
    REQUIRES = ("image", "question", "answers", "gt_objects")
    ADDS = ("reward_text", "reward_clip", "hallucinated", "reward_hallucination", "reward_coverage", "reward_judge",
            "reward")
    # With judge_model only, for audit (scored/): per answer, its claimed objects and the judge's P(yes) of each.
    JUDGE_ADDS = ("judge_claims", "judge_p_yes")

    def __init__(self, cfg: RewardsConfig, vocab, threads: int = 1):
        setup_torch(threads)
        self.cfg, self.vocab = cfg, vocab
        self.text = TextReward(cfg) if cfg.text_model else None
        self.clip = None
        if cfg.clip_model:
            from actors.select import ClipScorer
            self.clip = ClipScorer(cfg.clip_model, cfg.device, threads, cfg.dtype)
        self.judge = None
        if cfg.judge_model:
            self.judge = Judge(cfg.judge_model, cfg.device, threads, cfg.dtype)

    def __call__(self, batch):
        return guarded("rewards", batch, self._process)

    def _process(self, batch):
        questions = batch.column("question").to_pylist()
        answers = batch.column("answers").to_pylist()
        gts = batch.column("gt_objects").to_pylist()
        flat_q = [q for q, row in zip(questions, answers) for _ in row]
        flat_a = [a for row in answers for a in row]
        flat_text = self.text.score(flat_q, flat_a) if self.text and flat_a else [0.0] * len(flat_a)
        imgs = [open_png(b) for b in batch.column("image").to_pylist()] if (self.clip or self.judge) else None
        if self.clip and flat_a:
            flat_clip = self.clip.score([im for im, row in zip(imgs, answers) for _ in row], flat_a)
        else:
            flat_clip = [0.0] * len(flat_a)
        if not all(math.isfinite(v) for v in flat_text + flat_clip):
            raise ValueError("non-finite reward (NaN or inf)")
        # `asserted`: a "yes" to "Is there a X...?" claims X, a "no" does not (mentions alone can't tell).
        all_claims = [[self.vocab.asserted(q, a) for a in row] for q, row in zip(questions, answers)]
        verdicts = self._verdicts(imgs, all_claims) if self.judge else None
        out = {k: [] for k in self.ADDS + (self.JUDGE_ADDS if self.judge else ())}
        i = 0
        for r, (q, row, gt) in enumerate(zip(questions, answers, gts)):
            n = len(row)
            t, c = flat_text[i:i + n], flat_clip[i:i + n]
            i += n
            gt_set = set(gt or [])
            claims = all_claims[r]
            halluc = [[o for o in cl if o not in gt_set] for cl in claims]
            h = [-float(len(x)) for x in halluc]
            cov = coverage(claims, gt_set, self.vocab.asked_object(q))
            out["reward_text"].append(t)
            out["reward_clip"].append(c)
            out["hallucinated"].append(halluc)
            out["reward_hallucination"].append(h)
            out["reward_coverage"].append(cov)
            # The judge's term: minus the claims it refutes on this image (a count, as the hallucination term's).
            j = [-float(refuted(p)) for p in verdicts[r]] if verdicts is not None else [0.0] * n
            out["reward_judge"].append(j)
            if verdicts is not None:
                out["judge_claims"].append(claims)
                out["judge_p_yes"].append(verdicts[r])
            out["reward"].append(combine({"text": t, "clip": c, "hallucination": h, "coverage": cov, "judge": j},
                                         self.cfg.weights))
        for v in (v for row in out["reward"] for v in row):
            count("synthalign_reward", 1, "answers by combined-reward bucket", bucket=reward_bucket(v))
        if "answer_models" in batch.column_names:
            for row in batch.column("answer_models").to_pylist():
                for model in row:
                    count("synthalign_candidates", 1, "answers scored", model=model)
        if verdicts is not None:   # typed: a batch whose answers claim nothing would infer list<list<null>>
            import pyarrow as pa
            out["judge_claims"] = pa.array(out["judge_claims"], pa.list_(pa.list_(pa.string())))
            out["judge_p_yes"] = pa.array(out["judge_p_yes"], pa.list_(pa.list_(pa.float64())))
        return with_columns(add_node_tag(batch, "rewards"), out)

    def _verdicts(self, imgs, all_claims) -> list[list[list[float]]]:
        """Per row, per answer, the judge's P(yes) of each claimed object; each object is asked once per image."""
        asked = [list(dict.fromkeys(o for cl in claims for o in cl)) for claims in all_claims]
        p = [dict(zip(objs, ps)) for objs, ps in zip(asked, self.judge.p_yes(imgs, asked))]
        return [[[p[r][o] for o in cl] for cl in claims] for r, claims in enumerate(all_claims)]

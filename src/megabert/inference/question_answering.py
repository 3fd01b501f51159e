"""question-answering: the answer span of a question in a context, read in overlapping windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megabert.errors import UserError
from megabert.inference.base import Encoded, InputError, Pipeline, check_bool, check_top_k
from megabert.inference.batching import Row
from megabert.inference.qa_decoding import decode_example


@dataclass
class ContextWindow:
    """One window of a context, as :func:`megabert.inference.qa_decoding.decode_example` reads it."""

    offsets: list[tuple[int, int] | None]  # context character span per token; None off the context
    word_ids: list[int | None]
    cls_index: int = 0


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class QuestionAnsweringPipeline(Pipeline):
    """Extractive QA with ``transformers``' pipeline rules.

    Inputs: ``{"question": q, "context": c}`` or a ``(question, context)`` tuple. A context longer
    than a window is read in windows of ``max_seq_len`` tokens (question included) overlapping by
    ``doc_stride`` context tokens. Per window, the start and end logits of the context tokens
    (and ``[CLS]``) are softmax-normalised and a span scores ``p_start * p_end``; spans end at
    most ``max_answer_len - 1`` tokens after they start. Candidates of all windows are ranked.

    Call parameters: ``top_k`` (1), ``max_answer_len`` (15), ``max_seq_len`` (the smaller of 384
    and the model's length), ``doc_stride`` (the smaller of 128 and half a window),
    ``handle_impossible_answer`` (False: always give a span; True: the empty answer competes,
    scored ``p_start[CLS] * p_end[CLS]``), ``align_to_words`` (True: widen to whole words).

    Result: ``{"score", "start", "end", "answer"}`` with ``context[start:end] == answer`` for
    ``top_k=1``; a list of them, best first, for ``top_k > 1``.
    """

    task = "question-answering"
    call_defaults = {
        "top_k": 1,
        "max_answer_len": 15,
        "max_seq_len": None,
        "doc_stride": None,
        "handle_impossible_answer": False,
        "align_to_words": True,
    }

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params = dict(params)
        check_top_k(params["top_k"])
        _positive("max_answer_len", params["max_answer_len"])
        check_bool("handle_impossible_answer", params["handle_impossible_answer"])
        check_bool("align_to_words", params["align_to_words"])
        max_seq_len = params["max_seq_len"]
        if max_seq_len is None:
            max_seq_len = min(384, self.max_length)
        _positive("max_seq_len", max_seq_len, minimum=5)
        if max_seq_len > self.max_length:
            raise UserError(f"max_seq_len={max_seq_len} is more than the model takes ({self.max_length})")
        doc_stride = params["doc_stride"]
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        _positive("doc_stride", doc_stride, minimum=0)
        if doc_stride >= max_seq_len:
            raise UserError(f"doc_stride ({doc_stride}) must be smaller than max_seq_len ({max_seq_len})")
        params["max_seq_len"], params["doc_stride"] = max_seq_len, doc_stride
        return params

    def _is_single(self, inputs: Any) -> bool:
        return isinstance(inputs, dict) or (
            isinstance(inputs, tuple) and len(inputs) == 2 and all(isinstance(x, str) for x in inputs)
        )

    def _normalize(self, item: Any, index: int) -> tuple[str, str]:
        if isinstance(item, dict):
            if "question" not in item or "context" not in item:
                raise InputError(index, f"a dict input needs 'question' and 'context', got keys {sorted(item)}")
            question, context = item["question"], item["context"]
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            question, context = item
        else:
            raise InputError(index, f"expected (question, context) or a dict, got {type(item).__name__}")
        if not isinstance(question, str) or not isinstance(context, str):
            raise InputError(index, "question and context must be str")
        if not context.strip():
            raise InputError(index, "the context is empty")
        return question, context

    def _encode(self, items: list[tuple[str, str]], first: int, params: dict[str, Any]) -> list[Encoded]:
        max_seq_len, doc_stride = params["max_seq_len"], params["doc_stride"]
        questions = [q for q, _ in items]
        question_lengths = [len(ids) for ids in self.call_tokenizer(questions, add_special_tokens=False)["input_ids"]]
        # Windows overlap by `stride` context tokens, which must be fewer than the context tokens a
        # window holds next to its question ([CLS] question [SEP] context [SEP]).
        strides = []
        for i, n in enumerate(question_lengths):
            room = max_seq_len - n - 3
            if room < 1:
                raise InputError(
                    first + i,
                    f"the question has {n} tokens: with [CLS] and two [SEP] it fills the whole window "
                    f"of max_seq_len={max_seq_len} tokens, leaving no room for the context",
                )
            strides.append(min(doc_stride, room - 1))
        encoded: list[Encoded | None] = [None] * len(items)
        for stride in sorted(set(strides)):
            chosen = [i for i, s in enumerate(strides) if s == stride]
            encoding = self.call_tokenizer(
                [items[i][0] for i in chosen],
                [items[i][1] for i in chosen],
                truncation="only_second",
                max_length=max_seq_len,
                stride=stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
                return_token_type_ids=True,
                return_attention_mask=False,
            )
            windows: list[list[tuple[Any, ContextWindow]]] = [[] for _ in chosen]
            for r, sample in enumerate(encoding["overflow_to_sample_mapping"]):
                sequence_ids = encoding.sequence_ids(r)
                word_ids = encoding.word_ids(r)
                offsets = encoding["offset_mapping"][r]
                window = ContextWindow(
                    offsets=[tuple(o) if s == 1 else None for o, s in zip(offsets, sequence_ids)],
                    word_ids=[w if s == 1 else None for w, s in zip(word_ids, sequence_ids)],
                )
                row = Row(encoding["input_ids"][r], encoding["token_type_ids"][r])
                windows[sample].append((row, window))
            for i, item_windows in zip(chosen, windows):
                encoded[i] = Encoded([row for row, _ in item_windows], {"windows": [w for _, w in item_windows]})
        return encoded  # type: ignore[return-value]

    def _forward(self, batch: dict[str, torch.Tensor], params: dict[str, Any]) -> list[Any]:
        out = self.model(**batch)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        starts = out.start_logits.float().cpu().numpy()
        ends = out.end_logits.float().cpu().numpy()
        return [(starts[r, :n], ends[r, :n]) for r, n in enumerate(lengths)]

    def _postprocess(self, item: tuple[str, str], encoded: Encoded, outputs: list[Any], params: dict[str, Any]) -> Any:
        _, context = item
        prediction = decode_example(
            context,
            encoded.meta["windows"],
            [start for start, _ in outputs],
            [end for _, end in outputs],
            n_best=params["top_k"],
            max_answer_length=params["max_answer_len"],
            score="probability",
            allow_null=params["handle_impossible_answer"],
            align_to_words=params["align_to_words"],
        )
        answers = [
            {"score": span.score, "start": span.start, "end": span.end, "answer": span.text}
            for span in prediction.nbest
        ]
        if params["handle_impossible_answer"]:
            answers.append({"score": prediction.null_score, "start": 0, "end": 0, "answer": ""})
            answers.sort(key=lambda a: -a["score"])
        if not answers:  # no span fits (e.g. every window's context is cut to nothing)
            answers = [{"score": 0.0, "start": 0, "end": 0, "answer": ""}]
        return answers[0] if params["top_k"] == 1 else answers[: params["top_k"]]

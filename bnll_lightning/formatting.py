"""Rows -> token ids and labels: chat-template or plain formatting, prompt masking, truncation.

With a chat template: the full conversation is rendered with ``apply_chat_template`` and
tokenized once; for each assistant turn the conversation up to that turn (with the generation
prompt) and up to the end of that turn are rendered and tokenized too; both must be token
prefixes of the full conversation (checked, :class:`~bnll_lightning.sources.DataError` otherwise).
The tokens in between are the turn's targets: its content and end-of-turn token (``<|im_end|>``); a
template separator after the end-of-turn token (ChatML's ``"\\n"``) stays masked. Every assistant
turn with non-empty content is trained; system/user turns and turn headers are masked; turns after the
last assistant turn train nothing and are left out (counted: ``dropped_trailing_turns``); a conversation
that opens with the assistant's turn is a :class:`~bnll_lightning.sources.DataError` (a template
renders an assistant turn after the turns before it, and there are none). A template
that marks the assistant's tokens with ``{% generation %}`` is trusted instead: transformers'
``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives the targets.

Without a chat template (or ``use_chat_template=False``): ``[system_prompt + "\\n\\n"] +
prompt + "\\n"`` (masked; tokenized with the tokenizer's special prefix such as BOS), then the
response (+ EOS if ``add_eos``) as targets, each part tokenized separately so the prompt tokens
are exactly what generation will see. ``messages`` rows: system ``content + "\\n\\n"`` and user
``content + "\\n"`` masked, assistant ``content`` (+ EOS) trained, ``"\\n"`` between turns masked.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from bnll_lightning.objectives import IGNORE_INDEX
from bnll_lightning.sources import DataError

__all__ = ["END_OF_TURN_TOKENS", "STAT_KEYS", "Formatter", "end_of_turn_ids"]

STAT_KEYS = (
    "rows_in",  # rows read/generated for the split (after the val split, before skipping)
    "rows",  # rows emitted (tokenized, >= 1 target token)
    "tokens",  # non-padding tokens emitted
    "target_tokens",  # tokens with a label (!= -100)
    "truncated",  # rows cut at max_length but kept (truncation="right")
    "skipped_empty_response",  # rows without a non-empty response / assistant turn
    "skipped_truncated",  # rows whose targets were entirely cut away (truncation="right")
    "skipped_too_long",  # rows longer than max_length (truncation="drop")
    "skipped_zero_weight",  # training rows of weight 0 (they would train nothing)
    "dropped_trailing_turns",  # conversations whose turns after the last assistant turn were left out (kept)
    "noisy",  # rows whose response was corrupted (train only)
)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# End-of-turn tokens of common chat templates (in addition to the tokenizer's eos token).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Ids that end a turn: eos and the :data:`END_OF_TURN_TOKENS` the vocabulary has (trained on as
    targets; generation stops at them)."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    return ids if tokenizer.eos_token_id is None else ids | {int(tokenizer.eos_token_id)}


class Formatter:
    """Formats rows as in training and tokenizes them, the prompt masked (see the module docstring)."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None, use_chat_template: bool = True,
                 add_eos: bool = True) -> None:  # fmt: skip
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.use_chat_template, self.add_eos = use_chat_template, add_eos
        # Special tokens the tokenizer adds in front of plain text (e.g. BOS), never at the end.
        with_special = tokenizer("x")["input_ids"]
        without = tokenizer("x", add_special_tokens=False)["input_ids"]
        start = next(
            (i for i in range(len(with_special) - len(without) + 1) if with_special[i:i + len(without)] == without), 0
        )
        self._special_prefix = list(with_special[:start])
        # A template that marks the assistant's tokens ({% generation %}) says itself what to train:
        # transformers' return_assistant_tokens_mask reads it; other templates use the prefix method.
        template = getattr(tokenizer, "chat_template", None)
        self.marks_generation = isinstance(template, str) and bool(_GENERATION_TAG.search(template))
        self._end_of_turn = end_of_turn_ids(tokenizer)

    @property
    def chat(self) -> bool:
        """Whether rows are formatted with the tokenizer's chat template."""
        return bool(self.use_chat_template and getattr(self.tokenizer, "chat_template", None))

    def format_prompt(self, row: dict[str, Any] | str) -> str:
        """The text a model sees before generating the (last) response of ``row``, formatted
        exactly as in training. ``row`` is a row dict (``prompt`` [+ ``response``], or ``messages``
        ending with the assistant turn to predict or with the user turn to answer) or a prompt
        string."""
        if self.chat:
            return self._render(self._prompt_messages(row), add_generation_prompt=True)
        eos = self.tokenizer.eos_token or ""
        return "".join(
            text + (eos if trained and self.add_eos else "") for text, trained in self._prompt_parts(row)
        )

    def encode_prompt(self, row: dict[str, Any] | str) -> list[int]:
        """Token ids of :meth:`format_prompt`; identical to the masked prefix of the training row."""
        if self.chat:
            return self._ids(self.format_prompt(row))
        return self._plain_ids(self._prompt_parts(row))[0]

    @staticmethod
    def _without_answer(row: dict[str, Any] | str) -> dict[str, Any]:
        """``{"prompt": ...}``, or ``{"messages": [...]}`` without a final assistant turn."""
        if isinstance(row, str):
            return {"prompt": row}
        if "messages" not in row:
            return {"prompt": row["prompt"]}
        msgs = [dict(m) for m in row["messages"]]
        if msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        return {"messages": msgs}

    def _prompt_messages(self, row: dict[str, Any] | str) -> list[dict[str, str]]:
        row = self._without_answer(row)
        msgs = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
        return self._with_system(msgs)

    def _with_system(self, msgs: list[dict[str, str]]) -> list[dict[str, str]]:
        """``msgs`` with the system prompt (if set) first, unless they open with a system turn."""
        if self.system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def _prompt_parts(self, row: dict[str, Any] | str) -> list[tuple[str, bool]]:
        row = self._without_answer(row)
        if "messages" in row:
            return self._plain_parts({"messages": row["messages"] + [{"role": "assistant", "content": ""}]})[:-1]
        return self._plain_parts({"prompt": row["prompt"], "response": ""})[:-1]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _conversation(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """Messages of a row: system prompt first (if set), trailing non-assistant turns dropped."""
        if "messages" in row:
            msgs = [dict(m) for m in row["messages"]]
        else:
            msgs = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row.get("response", "")},
            ]
        msgs = self._with_system(msgs)
        while msgs and msgs[-1]["role"] != "assistant":
            msgs.pop()
        return msgs

    def _encode_chat(self, row: dict[str, Any]) -> tuple[list[int], list[int]] | None:
        msgs = self._conversation(row)
        targets = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and m["content"].strip()]
        if not targets:
            return None
        if msgs[0]["role"] == "assistant":
            raise DataError(
                f"{row.get('source', 'row')}: the conversation opens with the assistant's turn, which a chat template "
                "renders after the turns before it: start it with a user (or system) turn, set data.system_prompt, "
                "or set data.use_chat_template: false to train it as plain text"
            )
        if self.marks_generation:
            out = self.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
            ids = list(out["input_ids"])
            return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]
        full = self._ids(self._render(msgs, add_generation_prompt=False))
        labels = [IGNORE_INDEX] * len(full)
        for i in targets:
            before = self._ids(self._render(msgs[:i], add_generation_prompt=True))
            after = full if i == len(msgs) - 1 else self._ids(self._render(msgs[: i + 1], add_generation_prompt=False))
            for part, what in ((before, "with the generation prompt"), (after, "through that turn")):
                if full[: len(part)] != part:
                    raise DataError(
                        f"{row.get('source', 'row')}: chat template is not prefix-consistent: the tokens of the "
                        f"conversation up to assistant turn {i} ({what}) are not a prefix of the full "
                        "conversation's tokens, so the prompt cannot be masked exactly. Use "
                        "use_chat_template=False or a template that renders earlier turns identically."
                    )
            start, end = len(before), len(after)
            eot = [k for k in range(start, end) if full[k] in self._end_of_turn]
            if eot:
                end = eot[-1] + 1  # keep the end-of-turn token, mask the template's separator after it
            labels[start:end] = full[start:end]
        return full, labels

    def _plain_parts(self, row: dict[str, Any]) -> list[tuple[str, bool]]:
        """``(text, trained)`` parts of the plain (template-free) format; the last part is the
        last response (``messages`` rows: trailing non-assistant turns are dropped)."""
        parts: list[tuple[str, bool]] = []
        if "messages" in row:
            msgs = self._conversation(row)
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    if i > 0 and msgs[i - 1]["role"] == "assistant":
                        parts.append(("\n", False))
                    parts.append((m["content"], bool(m["content"].strip())))
                elif m["role"] == "system":
                    parts.append(((parts and parts[-1][1] and "\n" or "") + m["content"] + "\n\n", False))
                else:
                    parts.append(((parts and parts[-1][1] and "\n" or "") + m["content"] + "\n", False))
        else:
            head = f"{self.system_prompt}\n\n" if self.system_prompt is not None else ""
            parts.append((head + row["prompt"] + "\n", False))
            parts.append((row["response"], bool(row["response"].strip())))
        return parts

    def _plain_ids(self, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """Tokenize plain parts: special prefix (e.g. BOS), consecutive masked parts merged and
        tokenized together, each trained part tokenized on its own (+ EOS if ``add_eos``)."""
        eos = self.tokenizer.eos_token_id
        if self.add_eos and eos is None:
            raise DataError("add_eos=True but the tokenizer has no eos_token")
        ids: list[int] = list(self._special_prefix)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        masked_text = ""
        for text, trained in [*parts, ("", True)]:  # sentinel flushes the masked tail
            if not trained:
                masked_text += text
                continue
            if masked_text:
                seg = self._ids(masked_text)
                ids += seg
                labels += [IGNORE_INDEX] * len(seg)
                masked_text = ""
            if text:
                seg = self._ids(text) + ([int(eos)] if self.add_eos else [])
                ids += seg
                labels += seg
        return ids, labels

    def _encode_plain(self, row: dict[str, Any]) -> tuple[list[int], list[int]] | None:
        parts = self._plain_parts(row)
        if not any(trained for _, trained in parts):
            return None
        return self._plain_ids(parts)

    def tokenize(
        self, rows: list[dict[str, Any]], max_length: int, truncation: Literal["right", "drop"], weighted: bool = False
    ) -> tuple[list[int], list[dict[str, Any]], dict[str, int]]:
        """(indices of the rows kept, their features, stats :data:`STAT_KEYS`), each row at most ``max_length``
        tokens (``truncation``: cut or drop longer rows); ``weighted``: features carry ``weight``."""
        # A loop, not datasets' .map: rows are in memory once, their columns need not share a type (Arrow's
        # would), each skip is counted by reason, and nothing is cached to disk behind the config's back.
        stats = dict.fromkeys(STAT_KEYS, 0)
        stats["rows_in"] = len(rows)
        encode = self._encode_chat if self.chat else self._encode_plain
        kept, features = [], []
        for index, row in enumerate(rows):
            weight = row.get("weight", 1.0)
            if weighted and weight == 0:
                stats["skipped_zero_weight"] += 1
                continue
            encoded = encode(row)
            if encoded is None:
                stats["skipped_empty_response"] += 1
                continue
            msgs = row.get("messages") or []
            if msgs and msgs[-1]["role"] != "assistant":
                stats["dropped_trailing_turns"] += 1  # kept, and trained up to its last assistant turn
            ids, labels = encoded
            if len(ids) > max_length:
                if truncation == "drop":
                    stats["skipped_too_long"] += 1
                    continue
                ids, labels = ids[: max_length], labels[: max_length]
                if all(label == IGNORE_INDEX for label in labels):
                    stats["skipped_truncated"] += 1
                    continue
                stats["truncated"] += 1
            n_target = sum(label != IGNORE_INDEX for label in labels)
            if n_target == 0:  # e.g. a template that renders the response away
                stats["skipped_empty_response"] += 1
                continue
            stats["rows"] += 1
            stats["tokens"] += len(ids)
            stats["target_tokens"] += n_target
            kept.append(index)
            features.append({"input_ids": ids, "labels": labels, **({"weight": weight} if weighted else {})})
        return kept, features, stats

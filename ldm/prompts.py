"""Prompt syntax: AUTOMATIC1111's attention brackets and BREAK, parsed into weighted text pieces.

    (word)        weight x 1.1, nested: ((word)) x 1.21
    (word:1.3)    weight x 1.3 (any number, also 0 or negative)
    [word]        weight / 1.1
    \\( \\) \\[ \\] \\\\ \\:  the character itself
    BREAK         start a new chunk of the text encoder's context (upper case, a word of its own)

`parse_prompt(text)` returns the prompt as sections (split at BREAK), each a list of
`(text, weight)` pieces whose neighbours differ in weight: exactly the pieces and float weights
A1111's `parse_prompt_attention` gives (weights are multiplied in the same order, so they are
equal to the last bit), for every prompt it reads as its author meant.

Where A1111 silently reads a prompt differently from what was almost certainly meant, we refuse it
with a `PromptSyntaxError` that names the spot and the fix, instead of guessing:

- an unclosed `(` or `[` (A1111 weights the whole rest of the prompt);
- a `)` or `]` that closes nothing (A1111 keeps it as text);
- a colon inside round brackets that is not followed by a number and `)`, as in `(cat:abc)` or
  `(cat: 1.2)` (A1111 keeps `cat:abc` as text at x 1.1), and a number it cannot read (`(cat:1.2.3)`,
  which stops A1111 with an error); a literal colon there is written `\\:`;
- A1111's other prompt features, which this parser does not implement: prompt editing
  `[from:to:when]`, alternation `[a|b]`, composable prompts (`AND` in upper case) and
  extra-network tags (`<lora:name:0.8>`, `<hypernet:...>`: a LoRA is loaded with `--lora FILE:0.8`
  or `pipe.load_lora(FILE, 0.8)`, not named in the prompt).

One deliberate difference: BREAK inside brackets starts a new chunk like anywhere else (A1111
turns it into the word "break" with a negative weight).
"""

from __future__ import annotations

import re

__all__ = ["PromptSyntaxError", "parse_prompt", "Section"]

ROUND = 1.1  # (word)
SQUARE = 1 / 1.1  # [word]

Section = list[tuple[str, float]]

# One token of the syntax at a time: escapes, brackets, a weight that closes a round bracket,
# a bare colon or bar, or a run of ordinary text.
_TOKEN = re.compile(
    r"""
    \\(?P<escaped>[\s\S])?      # backslash + any character (a lone backslash at the end is dropped)
    | (?P<open>[(\[])
    | :(?P<weight>[+-]?[.\d]+)\)
    | (?P<close>[)\]])
    | (?P<colon>:)
    | (?P<bar>\|)
    | (?P<text>[^\\()\[\]:|]+)
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_AND = re.compile(r"\bAND\b")
_EXTRA_NETWORK = re.compile(r"<(?P<kind>lora|lyco|hypernet):(?P<args>[^<>]*)>")
_BREAK_MARK = object()  # a BREAK in the list of pieces


class PromptSyntaxError(ValueError):
    """A prompt the attention syntax cannot read as meant; the message names the spot and the fix."""


def _error(prompt: str, at: int, problem: str, fix: str) -> PromptSyntaxError:
    start = max(0, at - 20)
    snippet = ("..." if start else "") + prompt[start : at + 20] + ("..." if at + 20 < len(prompt) else "")
    return PromptSyntaxError(f"prompt {snippet!r}: {problem} at character {at}; {fix}")


def parse_prompt(prompt: str) -> list[Section]:
    """Sections of `(text, weight)` pieces; the sections are separated by BREAK.

    >>> parse_prompt("a (red:1.3) circle")
    [[('a ', 1.0), ('red', 1.3), (' circle', 1.0)]]
    >>> parse_prompt("((sky)), [sea] BREAK sun")
    [[('sky', 1.2100000000000002), (', ', 1.0), ('sea', 0.9090909090909091)], [('sun', 1.0)]]
    """
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string (got {type(prompt).__name__})")
    tag = _EXTRA_NETWORK.search(prompt)
    if tag:
        raise _extra_network_error(prompt, tag)
    pieces: list = []  # [text, weight] lists and _BREAK_MARKs, in order
    opened: list[tuple[str, int, int]] = []  # (bracket, index into pieces, position in prompt)

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not _BREAK_MARK:
                piece[1] *= factor

    def close(kind: str, at: int) -> tuple[str, int, int]:
        # The innermost open bracket of this kind (A1111 keeps one stack per kind).
        for i in range(len(opened) - 1, -1, -1):
            if opened[i][0] == kind:
                return opened.pop(i)
        char = ")" if kind == "(" else "]"
        raise _error(prompt, at, f"{char!r} closes no {kind!r}", f"remove it, or write \\{char} for the character itself")

    for m in _TOKEN.finditer(prompt):
        at = m.start()
        if m.group(0).startswith("\\"):
            if m.group("escaped") is not None:
                pieces.append([m.group("escaped"), 1.0])
        elif m.group("open"):
            opened.append((m.group("open"), len(pieces), at))
        elif m.group("weight") is not None:
            if not any(kind == "(" for kind, _, _ in opened):
                raise _error(prompt, at + len(m.group(0)) - 1, "')' closes no '('",
                             "remove it, or write \\) for the character itself")
            text = m.group("weight")
            try:
                weight = float(text)
            except ValueError:
                raise _error(prompt, at, f"the weight {text!r} is not a number",
                             "write one number after the colon, as in (word:1.3)") from None
            multiply(close("(", at)[1], weight)
        elif m.group("close"):
            kind = "(" if m.group("close") == ")" else "["
            multiply(close(kind, at)[1], ROUND if kind == "(" else SQUARE)
        elif m.group("colon"):
            if any(kind == "[" for kind, _, _ in opened):
                raise _error(prompt, at, "prompt editing [from:to:when] is not supported",
                             "write the prompt for one of its steps, or \\: for a literal colon")
            if any(kind == "(" for kind, _, _ in opened):
                after = prompt[at:].split(")", 1)[0]
                raise _error(prompt, at, f"malformed weight {after + ')'!r}",
                             "a weight is a number right after the colon, as in (word:1.3); "
                             "write \\: for a literal colon")
            pieces.append([":", 1.0])
        elif m.group("bar"):
            if any(kind == "[" for kind, _, _ in opened):
                raise _error(prompt, at, "alternation [a|b] is not supported",
                             "write one of the alternatives, or \\| for the character itself")
            pieces.append(["|", 1.0])
        else:
            text = m.group("text")
            found = _AND.search(text)
            if found:
                raise _error(prompt, at + found.start(), "composable prompts (AND) are not supported",
                             "write 'and' in lower case for the word, or make separate images")
            for i, part in enumerate(_BREAK.split(text)):
                if i:
                    pieces.append(_BREAK_MARK)
                pieces.append([part, 1.0])

    if opened:
        kind, _, at = opened[-1]
        closing = ")" if kind == "(" else "]"
        raise _error(prompt, at, f"{kind!r} is never closed",
                     f"close it with {closing!r}, or write \\{kind} for the character itself")
    return _sections(pieces)


def _extra_network_error(prompt: str, tag: re.Match) -> PromptSyntaxError:
    if tag.group("kind") == "hypernet":
        return _error(prompt, tag.start(), f"hypernetworks ({tag.group(0)}) are not supported", "remove the tag")
    name, _, scale = tag.group("args").partition(":")
    spec = f"{name}.safetensors" + (f":{scale}" if scale else "")
    return _error(prompt, tag.start(), f"LoRA tags such as {tag.group(0)} are not read from prompts",
                  f"load the LoRA with --lora {spec} (pipe.load_lora) and remove the tag")


def _sections(pieces: list) -> list[Section]:
    """Split at BREAKs and join neighbouring pieces of equal weight (as A1111 does, so that the
    text between them is tokenized as one)."""
    sections: list[Section] = [[]]
    for piece in pieces:
        if piece is _BREAK_MARK:
            sections.append([])
            continue
        text, weight = piece
        section = sections[-1]
        if section and section[-1][1] == weight:
            section[-1] = (section[-1][0] + text, weight)
        else:
            section.append((text, weight))
    return [[(t, w) for t, w in s if t] or [("", 1.0)] for s in sections]

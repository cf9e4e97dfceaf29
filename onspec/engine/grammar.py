"""Structured outputs: a grammar that constrains a request's tokens (a JSON schema, any JSON object, a regex,
an EBNF grammar, a choice of strings, a tool-call format), through xgrammar.

Why xgrammar: its per-token mask costs 0.004-0.009 ms on these CPUs against a 13-15 ms decoding step, it
walks a draft tree in C++ (``traverse_draft_tree``), rolls back for free and finds jump-forward tokens
(docs/decisions.md, 'Grammar engine'). It is imported only when a request asks for a grammar.

Lossless speculation under a grammar. The constrained distribution at a position is the model's
distribution with every token the grammar forbids there set to -inf (then the request's penalties,
temperature and truncations, as without a grammar). A draft tree's row ``i`` is the distribution after the
committed tokens plus the drafted tokens on the root->i path, so its mask is the grammar's mask after
exactly those tokens:

* ``GrammarState.constrain`` walks the tree from the committed state (the matcher always holds the
  committed output: ``accept`` is called on commit), fills one mask row per node and drops every node whose
  token its parent's row forbids, with its subtree, before the forward: a forbidden draft could never be
  accepted, so verifying it would only cost time;
* the engine sets the forbidden logits of each row to -inf before verification, so greedy verification
  picks plain constrained decoding's argmax and rejection sampling compares against the constrained
  distribution;
* the matcher advances only by committed tokens, so rejected drafts leave nothing to roll back (the walk
  rolls back its own steps).

Compiled grammars are cached by their spec (``GrammarCompiler``); every sequence gets its own matcher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from ..speculation.tree import DraftTree

GrammarKind = Literal["json", "regex", "ebnf", "choice", "structural_tag"]
KINDS: tuple[str, ...] = ("json", "regex", "ebnf", "choice", "structural_tag")


class GrammarError(ValueError):
    """A grammar the engine cannot use; the message starts with the request field it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to.

    ``kind``/``source``: ``json`` with a JSON schema as JSON text ("" for any JSON object), ``regex``,
    ``ebnf`` (xgrammar's EBNF), ``choice`` (a JSON list of strings: exactly one of them), ``structural_tag``
    (xgrammar's structural tag as JSON: free text with tagged, schema-checked sections such as tool calls).
    ``field``: the request field it came from, named in errors. JSON is compact (no free whitespace:
    ``{"a": 1, "b": [2, 3]}``): a small model left free whitespace can emit newlines forever, and compact
    output has longer forced runs for jump-forward drafting."""

    kind: GrammarKind
    source: str = ""
    field: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(self.field, f"unknown grammar kind {self.kind!r}; one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: dict | None, field: str = "response_format") -> GrammarSpec:
        """A JSON schema (checked against the JSON Schema meta-schema), or None for any JSON object."""
        if schema is not None:
            check_schema(schema, field)
        return cls("json", json.dumps(schema) if schema is not None else "", field)  # key order is output order

    @classmethod
    def choice(cls, options: list[str], field: str = "guided_choice") -> GrammarSpec:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError(field, "must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options)), field)


def check_schema(schema: Any, field: str) -> dict:
    """``schema`` if it is a valid JSON Schema object, else a ``GrammarError`` naming ``field`` and where."""
    import jsonschema

    if not isinstance(schema, dict):
        raise GrammarError(field, "the JSON schema must be an object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise GrammarError(field, f"invalid JSON schema at {where}: {exc.message}") from None
    return schema


def _xgrammar():
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - xgrammar is a core dependency; a broken install ends here
        raise GrammarError("response_format", "structured outputs need the xgrammar package "
                                              "(pip install xgrammar)") from None
    return xgrammar


class GrammarCompiler:
    """One per engine: the vocabulary as xgrammar sees it, and compiled grammars by spec."""

    def __init__(self, info: Any, vocab_size: int, cache_size: int = 64) -> None:
        self.vocab_size = vocab_size
        self.info = info
        self.compiler = _xgrammar().GrammarCompiler(info)
        self.compile = lru_cache(maxsize=cache_size)(self._compile)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> GrammarCompiler:
        """The model's vocabulary may be larger than the tokenizer's (padding rows) or smaller (tiny test
        models): xgrammar masks exactly the model's ids."""
        info = _xgrammar().TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        return cls(info, vocab_size)

    @classmethod
    def for_vocabulary(cls, tokens: list[str], stop_ids: list[int]) -> GrammarCompiler:
        """A vocabulary given as the text of each token id (stop tokens: any text), for models without a
        Hugging Face tokenizer."""
        xgr = _xgrammar()
        info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, stop_token_ids=stop_ids)
        return cls(info, len(tokens))

    def _compile(self, spec: GrammarSpec):
        xgr = _xgrammar()
        try:
            if spec.kind == "json":
                if not spec.source:  # any JSON object (OpenAI's json_object), with any properties
                    return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                             strict_mode=False)
                return self.compiler.compile_json_schema(spec.source, any_whitespace=False)
            if spec.kind == "regex":
                return self.compiler.compile_regex(spec.source)
            if spec.kind == "ebnf":
                return self.compiler.compile_grammar(spec.source)
            if spec.kind == "choice":
                options = json.loads(spec.source)
                return self.compiler.compile_grammar(xgr.Grammar.from_ebnf(
                    "root ::= " + " | ".join(json.dumps(o) for o in options)))
            return self.compiler.compile_structural_tag(xgr.StructuralTag.model_validate_json(spec.source))
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse and unsupported-feature errors
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise GrammarError(spec.field, f"the {_NAMES[spec.kind]} cannot be used: {message}") from None

    def state(self, spec: GrammarSpec) -> GrammarState:
        """A fresh matcher at the start of the output (compiles the spec on first use)."""
        return GrammarState(_xgrammar().GrammarMatcher(self.compile(spec)), self.vocab_size)


_NAMES = {"json": "JSON schema", "regex": "regex", "ebnf": "grammar", "choice": "choice",
          "structural_tag": "structural tag"}


@dataclass
class ConstrainedTree:
    """A draft tree with the nodes the grammar forbids removed, and each kept node's mask (packed bits,
    [len(tree), ceil(vocab / 32)] int32, bit t of row i set when token t may follow node i)."""

    tree: DraftTree
    mask: torch.Tensor


class GrammarState:
    """One sequence's grammar matcher; it always stands at the sequence's committed output."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32

    @property
    def terminated(self) -> bool:
        """The grammar ended and its stop token was accepted: nothing may follow."""
        return self.matcher.is_terminated()

    def accept(self, tokens: list[int]) -> bool:
        """Advance by committed tokens; False if the grammar refused one (the rest are not taken)."""
        for t in tokens:
            if not self.matcher.accept_token(t):
                return False
        return True

    def next_mask(self) -> torch.Tensor:
        """The mask of the next token after the committed output, [1, words]."""
        mask = torch.empty(1, self.words, dtype=torch.int32)
        self.matcher.fill_next_token_bitmask(mask, 0)
        return mask

    def constrain(self, tree: DraftTree) -> ConstrainedTree:
        """Masks of every node, and the tree without the nodes the grammar forbids (module docstring)."""
        n = len(tree)
        mask = torch.zeros(n, self.words, dtype=torch.int32)
        if n == 1:
            self.matcher.fill_next_token_bitmask(mask, 0)
            return ConstrainedTree(tree, mask)
        first_child = [-1] * n
        next_sibling = [-1] * n
        for i in range(n - 1, 0, -1):  # children in index order: i's next sibling is the previous first child
            p = tree.parents[i]
            next_sibling[i], first_child[p] = first_child[p], i
        self.matcher.traverse_draft_tree(torch.tensor(first_child, dtype=torch.int64),
                                         torch.tensor(next_sibling, dtype=torch.int64),
                                         torch.tensor(tree.tokens, dtype=torch.int64), mask)
        keep = [0]
        allowed = [True] + [False] * (n - 1)
        for i in range(1, n):  # parents precede children
            t, p = tree.tokens[i], tree.parents[i]
            if allowed[p] and 0 <= t < self.vocab_size and (int(mask[p, t >> 5]) >> (t & 31)) & 1:
                allowed[i] = True
                keep.append(i)
        # i.i.d. children (verify.py) drawn from q reach verification only where the grammar allows them, so
        # what the verifier sees are i.i.d. draws from q restricted to the allowed tokens and renormalised
        # (given which draws survive, each survivor is such a draw), whether or not some were dropped.
        dists = {}
        for i, q in tree.child_dists.items():
            if allowed[i]:
                q = q.masked_fill(~unpack(mask[i:i + 1], q.shape[-1])[0], 0.0)
                if float(q.sum()) > 0:
                    dists[i] = q / q.sum()
        if len(keep) == n and not tree.child_dists:
            return ConstrainedTree(tree, mask)
        return ConstrainedTree(tree.select(keep, dists), mask[keep])

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next whatever the model does (jump-forward): keys, punctuation, the
        rest of an enum value, closing brackets. xgrammar's tokenization of the forced text, without a last
        token that a longer one could extend; empty where the next token is free."""
        return list(self.matcher.find_jump_forward_tokens())


def unpack(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Packed mask rows [n, words] -> bool [n, vocab]. The words are read as little-endian bytes, so bit t
    of a row is bit t % 8 of byte t // 8; bits past ``vocab`` are ignored."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (mask.contiguous().view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    return bits.view(torch.bool).reshape(mask.shape[0], -1)[:, :vocab]


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of logits with every token their mask row forbids set to -inf (a new float32 tensor; ``logits``
    may be the model's own rows, which still give logprobs)."""
    return torch.where(unpack(mask, logits.shape[-1]), logits.to(torch.float32), float("-inf"))

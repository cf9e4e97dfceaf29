"""The offline Python API, in the spirit of vLLM: ``LLM(...).generate(prompts, SamplingParams(...))``.

    from onspec import LLM, SamplingParams
    llm = LLM(model="default", dtype="bfloat16", speculation="auto")
    out = llm.generate(["Write a haiku about the sea."], SamplingParams(temperature=0, max_tokens=64))
    print(out[0].outputs[0].text)

``chat`` applies the model's chat template; ``stream`` yields text as it is committed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Iterator

from .config import EngineConfig, SpecConfig
from .engine.engine import Engine, SeqDelta
from .engine.sampler import SamplingParams
from .engine.sequence import Sequence

Message = dict[str, str]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    acceptance_length: float = 0.0   # tokens committed per target forward while decoding
    drafted: int = 0
    accepted: int = 0
    by_strategy: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


def completion_of(seq: Sequence, index: int) -> CompletionOutput:
    st = seq.stats
    return CompletionOutput(index=index, text=seq.text, token_ids=list(seq.output_ids),
                            finish_reason=seq.finish_reason,
                            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                            acceptance_length=st.acceptance_length, drafted=st.drafted, accepted=st.accepted,
                            by_strategy={k: list(v) for k, v in st.by_strategy.items()})


class LLM:
    def __init__(self, model: str = "default", dtype: str = "bfloat16", speculation: str = "auto",
                 spec: SpecConfig | None = None, engine: Engine | None = None, speculator: str = "",
                 **engine_kwargs) -> None:
        """``speculator``: a drafter checkpoint directory: an EAGLE-3 head (strategies ``"learned"``,
        ``"hybrid"``) or a parallel drafter (``"parallel"``; ``onspec export-speculator --parallel``), told
        apart by its config. ``"learned"`` and ``"hybrid"`` need a head, ``"parallel"`` a parallel drafter,
        either given here or a promoted version (``onspec warmup``; onspec/train/frozen.py)."""
        if engine is None:
            spec = replace(spec or SpecConfig(), mode=speculation)
            cfg = EngineConfig(model=model, dtype=dtype, spec=spec, **engine_kwargs)
            engine = Engine(cfg)
            from .train.frozen import attach_for_mode

            attach_for_mode(engine, spec, speculator=speculator)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    # ---- prompts -----------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[Message]) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("messages: each message needs 'role' and 'content'")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None,
                 use_tqdm: bool = False, priorities: list[int] | None = None) -> list[RequestOutput]:
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = []
        try:
            for i, prompt in enumerate(prompts):
                rid = f"gen-{next(self._ids)}"
                self.engine.add_request(rid, prompt, params, priority=(priorities or [0] * len(prompts))[i])
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        self._run(ids, use_tqdm)
        return [self._collect(rid, p) for rid, p in zip(ids, prompts)]

    def chat(self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None,
             use_tqdm: bool = False) -> RequestOutput | list[RequestOutput]:
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else messages
        outs = self.generate([self.apply_chat_template(c) for c in convs], params, use_tqdm)  # type: ignore[arg-type]
        return outs[0] if single else outs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[SeqDelta]:
        """Yield each step's new text for one prompt (all n samples), until every sample finishes."""
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params or SamplingParams())
        try:
            while not all(s.finished for s in self.engine.requests[rid]):
                for d in self.engine.step():
                    if d.request_id == rid and (d.new_text or d.new_token_ids or d.finished):
                        yield d
        finally:
            if not all(s.finished for s in self.engine.requests.get(rid, [])):
                self.engine.abort(rid)
            self.engine.release_request(rid)

    def _run(self, ids: list[str], use_tqdm: bool) -> None:
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req")
        pending = set(ids)
        self.engine.set_closed_batch(True)  # the call returns when the whole batch is done
        try:
            while pending:
                self.engine.step()
                done = {rid for rid in pending if all(s.finished for s in self.engine.requests[rid])}
                pending -= done
                if bar:
                    bar.update(len(done))
        finally:
            self.engine.set_closed_batch(False)
            if bar:
                bar.close()

    def _collect(self, rid: str, prompt: str | list[int]) -> RequestOutput:
        seqs = self.engine.requests[rid]
        out = RequestOutput(request_id=rid, prompt=prompt if isinstance(prompt, str) else None,
                            prompt_token_ids=list(seqs[0].prompt_ids),
                            outputs=[completion_of(s, i) for i, s in enumerate(seqs)], finished=True)
        self.engine.release_request(rid)
        return out

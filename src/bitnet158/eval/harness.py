"""The lm-evaluation-harness adapter: `--model bitnet158 --model_args path=...`.

Importing this module registers the model class under the name `bitnet158` in lm-eval's
model registry. lm-eval 0.4 discovers no plugins by entry point, so its own `lm_eval` command
does not import us; run lm-eval's command line with the adapter registered instead:

    bitnet158 eval harness --model bitnet158 --model_args path=model.safetensors \\
        --tasks arc_easy,piqa --batch_size 8

or from Python:

    import lm_eval, bitnet158.eval.harness  # noqa: F401  (registers "bitnet158")
    lm_eval.simple_evaluate(model="bitnet158", model_args="path=m.safetensors", tasks=[...])

model_args: path (our file, a Hugging Face directory, or the shipped model; default the
shipped one), backend (engine | torch, default engine), max_length (tokens one forward sees;
default the model's context), threads, max_gen_toks (default 256), add_bos_token.
Requests are sorted longest first and scored `batch_size` sequences per call: the torch
backend runs a batch as one padded forward, the engine one sequence after another.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import lm_eval.models  # noqa: F401  (lm-eval's own models, registered before ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences
from tqdm import tqdm

from .scoring import make_scorer

log = logging.getLogger(__name__)

Request = tuple[
    tuple[str, str] | None, list[int], list[int]
]  # (key, context ids, continuation ids)


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval's batch_size argument as an int ("auto" has nothing to probe on a CPU: 8)."""
    if batch_size is None:
        return 1
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or 8)
    size = int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return size


@register_model("bitnet158")
class BitNet158LM(TemplateLM):
    """BitNet b1.58 models for lm-eval, on the native engine or the torch reference."""

    def __init__(
        self,
        path: str | None = None,
        backend: str = "engine",
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        threads: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        device: str | None = None,
        **unused,
    ) -> None:
        super().__init__()
        if device not in (None, "cpu"):
            log.info("bitnet158 runs on the CPU; ignoring device=%s", device)
        if unused:
            log.warning("bitnet158: ignoring unknown model_args %s", sorted(unused))
        threads = int(threads) if threads is not None else None
        max_length = int(max_length) if max_length is not None else None
        self.scorer = make_scorer(path, backend, threads=threads, max_context=max_length)
        self.tokenizer = self.scorer.tokenizer
        self.backend_name = backend
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.max_length = self.scorer.max_context
        self.max_gen_toks = int(max_gen_toks)
        if isinstance(add_bos_token, str):
            add_bos_token = add_bos_token.lower() in ("1", "true", "yes")
        has_bos = self.tokenizer.bos_token_id is not None
        self.add_bos_token = has_bos and (
            self.tokenizer.add_bos_token if add_bos_token is None else bool(add_bos_token)
        )

    # --- tokens -----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_ids
        if not eos:
            raise ValueError(f"{self.scorer.path}: the tokenizer names no end-of-sequence token")
        return eos[0]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS where the model has one."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.scorer.path).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt
        )

    # --- scoring ----------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether it is the greedy continuation)."""

        def sequence(req: Request) -> list[int]:
            _, context, continuation = req
            if not continuation:
                raise ValueError(f"empty continuation for context {req[0]!r}")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens exceeds max_length "
                    f"{self.max_length}"
                )
            return (context + continuation)[-(self.max_length + 1) :]  # left-truncated

        collator = Collator(
            requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2]))
        )
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), desc="bitnet158 loglikelihood", disable=disable_tqdm)
        for batch in collator.get_batched(n=override_bs or self.batch_size):
            scores = self.scorer.score([sequence(req) for req in batch])
            for req, s in zip(batch, scores, strict=True):
                n = len(req[2])
                answer = (float(s.logprobs[-n:].sum()), bool(s.greedy[-n:].all()))
                results.append(answer)
                if req[0] is not None:
                    self.cache_hook.add_partial("loglikelihood", req[0], answer)
            bar.update(len(batch))
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of max_length tokens."""
        windows: list[tuple[int, Request]] = []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=tokens,
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((i, (None, context, continuation)))
        scores = self._loglikelihood_tokens([w for _, w in windows], disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for (i, _), (logprob, _) in zip(windows, scores, strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, EOS or max_gen_toks (one at a time)."""
        eos_text = self.tokenizer.id_to_token(self.eot_token_id)
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_fn=lambda args: args[1],
            group_by="gen_kwargs",
        )
        results: list[str] = []
        bar = tqdm(total=len(requests), desc="bitnet158 generate_until", disable=disable_tqdm)
        for batch in collator.get_batched(n=1):
            for context, gen_kwargs in batch:
                kwargs = dict(gen_kwargs)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
                do_sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
                ids = self.tok_encode(context)
                keep = max(1, self.max_length - max_new)
                text = self.scorer.generate(
                    ids[-keep:], max_new, stop=until, temperature=temperature,
                    seed=kwargs.pop("seed", 0),
                )  # fmt: skip
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...`) with the bitnet158 model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()

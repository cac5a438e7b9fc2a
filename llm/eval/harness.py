"""EleutherAI's lm-evaluation-harness on our own model and tokenizer, no export step.

`LLMHarness` is an lm-eval model (registered as `llm` once this module is imported, so
`lm_eval.simple_evaluate(model="llm", model_args="checkpoint=runs/x/checkpoints")` works too): loglikelihood (multiple choice), rolling loglikelihood
(perplexity tasks) and greedy or sampled generation until a stop string. It follows what lm-eval's
`hf` model does for a causal LM, so the scores equal those of `lm_eval --model hf` on our Hugging
Face export (tested to 1e-4): the context is cut from the left to the model's context, empty
contexts are conditioned on EOS, rolling windows are lm-eval's own (`get_rolling_token_windows`,
context 1), generation keeps the last `max_length - max_gen_toks` context tokens.

Needs the `eval` extra (`pip install -e ".[eval]"`).
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from llm.errors import LLMError
from llm.eval.generate import generate
from llm.model.gpt import GPT

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # the optional dependency: evaluate.py says how to install it
    TemplateLM = object  # type: ignore[misc,assignment]
    register_model = None  # type: ignore[assignment]


class HarnessError(LLMError, RuntimeError):
    """lm-eval missing, or a task it cannot find or run."""


def require_lm_eval() -> None:
    if TemplateLM is object:
        raise HarnessError('lm-evaluation-harness is not installed; pip install -e ".[eval]" (or lm-eval)')


class LLMHarness(TemplateLM):  # type: ignore[misc,valid-type]
    def __init__(self, model: GPT | None = None, tokenizer: Any = None, *, checkpoint: str | None = None,
                 batch_size: int | str = 16, device: str | None = None, verify: bool = True) -> None:  # fmt: skip
        require_lm_eval()
        super().__init__()
        if model is None:  # built by lm-eval from --model_args checkpoint=...
            from llm.checkpoint.merge import load_trained_model
            from llm.data.tokenizer import run_tokenizer
            from llm.eval.process import default_device

            if checkpoint is None:
                raise HarnessError("--model llm needs --model_args checkpoint=<checkpoint directory>")
            cfg, model = load_trained_model(checkpoint, device=device or default_device(), verify=verify)
            tokenizer = run_tokenizer(cfg.data.tokenizer, None)
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def max_length(self) -> int:
        return int(self.model.cfg.max_positions)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return str(self.tok.decode(list(tokens)))

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Each request: (strings, context ids, continuation ids) -> (sum of log p(continuation), greedy?)."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            inputs = [(list(ctx) + list(cont))[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            width = max(len(x) for x in inputs)
            batch = torch.zeros(len(inputs), width, dtype=torch.long, device=self.device)
            for i, x in enumerate(inputs):  # right padding: a causal model's earlier positions never see it
                batch[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            logprobs = torch.log_softmax(self.model(batch).float(), dim=-1)
            for i, (x, (_, _, cont)) in enumerate(zip(inputs, chunk)):
                n = len(cont)
                rows = logprobs[i, len(x) - n : len(x)]  # (n, V): the positions predicting the continuation
                target = torch.tensor(list(cont), dtype=torch.long, device=self.device)
                greedy = bool((rows.argmax(dim=-1) == target).all())
                out.append((float(rows.gather(1, target[:, None]).sum()), greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in (r.args for r in requests):
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )  # fmt: skip
            ]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            results.append(sum(s for s, _ in scores))
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = max(1, min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1))
            ids = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.eot_token_id]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            new = generate(self.model, ids, max_new_tokens=max_new, temperature=temperature,
                           eos_id=self.eot_token_id, sliding_window=True)  # fmt: skip
            text = self.tok_decode([t for t in new if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            results.append(text)
        return results


if register_model is not None:
    import lm_eval.models  # noqa: F401  (lm-eval fills its registry only while it is empty: load its models first)

    register_model("llm")(LLMHarness)


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager that knows `tasks` (lm-eval's own ~15k task files take seconds to
    index: only searched when `include_path` does not hold them all)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = (
            f" or in --include-path '{include_path}'"
            if include_path
            else " (local task YAMLs: --include-path DIR)"
        )
        raise HarnessError(f"lm-eval knows no task {', '.join(missing)}{where}")
    return manager


def run_tasks(model: GPT, tokenizer: Any, tasks: list[str], *, num_fewshot: int | None = None,
              limit: float | None = None, include_path: str | None = None, batch_size: int = 16,
              log_samples: bool = False, manager: Any = None) -> dict[str, Any]:  # fmt: skip
    """lm-eval's simple_evaluate on our model; returns its results dict. `manager`: a
    `task_manager(tasks, include_path)` to reuse across calls."""
    import lm_eval

    manager = manager or task_manager(tasks, include_path)
    harness = LLMHarness(model, tokenizer, batch_size=batch_size)
    offline = _go_offline_unless_the_hub_answers()
    try:
        results = lm_eval.simple_evaluate(model=harness, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=log_samples)  # fmt: skip
    except ConnectionError as e:  # datasets' "Couldn't reach 'owner/name' on the Hub"
        found = re.search(r"'([\w.-]+(?:/[\w.-]+)?)' on the Hub", str(e))
        dataset = f"dataset '{found.group(1)}'" if found else "dataset"
        why = "the hub is not reachable from here" if offline else "the hub did not answer"
        raise HarnessError(
            f"lm-eval task {', '.join(tasks)} needs its {dataset} from the Hugging Face hub, {why} and it is not in "
            "the local cache (HF_HOME): run it once where the hub is reachable (the cache then serves it offline), "
            "or use a task on local files (dataset_path: json; an example: examples/lm_eval_tasks, --include-path)"
        ) from None
    if results is None:  # only on ranks other than lm-eval's rank 0
        raise HarnessError("lm-eval returned no results")
    return dict(results)


def _go_offline_unless_the_hub_answers(timeout: float = 3.0) -> bool:
    """Puts `datasets` and `huggingface_hub` in offline mode (the local cache only) when the hub does not
    answer within `timeout` seconds, or when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say so; returns
    whether it is offline. Without this, every dataset lookup retries for half a minute first."""
    import datasets.config
    import huggingface_hub.constants

    offline = bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)
    if not offline:
        host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError:
            offline = True
    if offline:  # both libraries read these at call time
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    return offline


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    return out


def training_evaluator(cfg: Any) -> Any:
    """The `periodic_eval` hook of `run_pretraining` for `eval.lm_eval_tasks`: scores the live model
    (rank 0) and returns {"lm_eval/<task>/<metric>": value} for lm-eval's numeric metrics."""
    require_lm_eval()
    from llm.data.tokenizer import run_tokenizer

    tokenizer = run_tokenizer(cfg.data.tokenizer, None)
    e = cfg.eval
    tasks = list(e.lm_eval_tasks)
    manager = task_manager(tasks, e.lm_eval_include_path)  # once: unknown tasks fail before training starts

    def evaluate(model: Any, iteration: int) -> dict[str, float]:
        results = run_tasks(model, tokenizer, tasks, num_fewshot=e.lm_eval_num_fewshot, limit=e.lm_eval_limit,
                            include_path=e.lm_eval_include_path, manager=manager)  # fmt: skip
        return {
            f"lm_eval/{task}/{metric.split(',')[0]}": float(value)
            for task, metrics in results["results"].items()
            for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric
        }

    return evaluate

"""Real clients, unchanged, against a real ``lscale up``: lm-eval-harness and guidellm.

- **lm-eval-harness** ``local-completions`` runs a loglikelihood task (multiple choice) and a
  generate_until task, both defined here with a local jsonl dataset (no download), and its own
  ``hf`` backend runs the same tasks on the same checkpoint: every sample's loglikelihoods
  agree within 1e-4, greedy flags and generations are equal, and so are the metrics.
- **guidellm** runs a concurrent benchmark (synthetic prompts, the checkpoint's tokenizer) and
  writes its report: every request succeeds and TTFT and ITL are measured.

Both run with the Hugging Face hub offline. Marked ``clients`` (minutes on two cores): not in
the default run; ``make test-clients`` runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.clients, pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "tiny-llama"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOL = 1e-4

DOCS = [
    {"question": f"The quick brown fox number {i} jumps over",
     "choices": [" the lazy dog", " a river", " nothing at all", " the fox"], "answer": i % 4}
    for i in range(8)
]

TASKS = {
    "lscale_mc": """
        task: lscale_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
    """,
    "lscale_gen": """
        task: lscale_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{choices[0]}}}}"
        generation_kwargs:
          until: ["."]
          max_gen_toks: 8
          do_sample: false
          temperature: 0
        metric_list:
          - metric: exact_match
    """,
}

# runs one lm-eval backend in its own process (lm-eval's imports and state stay out of pytest)
RUNNER = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
tasks_dir, model, model_args, out = sys.argv[1:5]
result = lm_eval.simple_evaluate(model=model, model_args=model_args,
                                 tasks=["lscale_mc", "lscale_gen"],
                                 task_manager=TaskManager(include_path=tasks_dir),
                                 log_samples=True, batch_size=1)
samples = {task: sorted([[s["doc_id"], s["filtered_resps"]] for s in rows])
           for task, rows in result["samples"].items()}
metrics = {task: {k: v for k, v in r.items() if k.endswith(",none")}
           for task, r in result["results"].items()}
json.dump({"samples": samples, "metrics": metrics}, open(out, "w"))
"""


def run_lm_eval(work: Path, model: str, model_args: str) -> dict[str, Any]:
    out = work / f"{model}.json"
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(work / "tasks"), model, model_args, str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_lm_eval_harness_matches_its_hf_backend(cluster: tuple[str, Path],
                                                tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    url, state = cluster
    checkpoint = state / "checkpoints" / MODEL
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    for name, text in TASKS.items():
        (tmp_path / "tasks" / f"{name}.yaml").write_text(
            textwrap.dedent(text).format(data=data))
    # both backends tokenize with the checkpoint's tokenizer, BOS included
    ours = run_lm_eval(tmp_path, "local-completions", ",".join([
        f"model={MODEL}", f"base_url={url}/v1/completions", "tokenizer_backend=huggingface",
        f"tokenizer={checkpoint}", "tokenized_requests=True", "add_bos_token=True",
        "num_concurrent=4", "max_retries=1"]))
    reference = run_lm_eval(tmp_path, "hf", f"pretrained={checkpoint},dtype=float32,device=cpu,"
                                            "add_bos_token=True")

    mc_ours, mc_ref = ours["samples"]["lscale_mc"], reference["samples"]["lscale_mc"]
    assert len(mc_ours) == len(mc_ref) == len(DOCS)
    for (doc, got), (doc_ref, want) in zip(mc_ours, mc_ref, strict=True):
        assert doc == doc_ref and len(got) == len(want) == len(DOCS[doc]["choices"])
        for (logprob, greedy), (logprob_ref, greedy_ref) in zip(got, want, strict=True):
            assert abs(logprob - logprob_ref) <= TOL, (doc, logprob, logprob_ref)
            assert greedy == greedy_ref
    assert ours["samples"]["lscale_gen"] == reference["samples"]["lscale_gen"]
    for task in ("lscale_mc", "lscale_gen"):
        for metric, value in reference["metrics"][task].items():
            if "stderr" not in metric:
                assert ours["metrics"][task][metric] == pytest.approx(value), (task, metric)


def test_guidellm_reports_ttft_and_itl(cluster: tuple[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("guidellm")
    url, state = cluster
    report = tmp_path / "guidellm.json"
    requests = 24
    done = subprocess.run(
        [sys.executable, "-m", "guidellm", "run",
         "--backend", f"kind=openai_http,target={url},model={MODEL}",
         "--profile", "kind=concurrent,streams=4",
         "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
         "--tokenizer", f"kind=huggingface_auto,model={state / 'checkpoints' / MODEL}",
         "--constraint", f"kind=max_requests,count={requests}",
         "--output", f"kind=json,path={report}", "--disable-console-interactive"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    made = benchmark["scheduler_metrics"]["requests_made"]
    assert made["successful"] == requests and made["errored"] == 0, made
    metrics = benchmark["metrics"]
    for name in ("time_to_first_token_ms", "request_latency"):  # one figure per request
        figures = metrics[name]["successful"]
        assert figures["count"] == requests and figures["mean"] > 0, (name, figures)
    itl = metrics["inter_token_latency_ms"]["successful"]  # one per token after the first
    assert itl["count"] >= requests and itl["mean"] > 0, itl
    assert metrics["output_token_count"]["successful"]["mean"] > 0

"""Evaluation through lm-evaluation-harness (an optional dependency: ``pip install 'lm_eval[api]'``).

    harness.py        importing lm_eval (or saying how to install it); the task index over bundled + user YAMLs
    lm_eval_model.py  `HybridLMEval`: lm-eval's LM interface on a HybridLM, registered as model "hybridlm"
    tasks.py          the bundled tasks (KJV verse completion, the reasoning task) and `evaluate_tasks`
    task_files/       their lm-eval YAMLs

Nothing here imports lm_eval until it is used.
"""

from .harness import BUNDLED_TASKS_DIR, import_lm_eval
from .tasks import BUNDLED_TASKS, evaluate_tasks, kjv_verse_docs, results_table

__all__ = ["BUNDLED_TASKS", "BUNDLED_TASKS_DIR", "evaluate_tasks", "import_lm_eval", "kjv_verse_docs",
           "results_table"]

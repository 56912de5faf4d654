"""Fine-tuning tasks: one file per family (head + loss + metric + predictions)."""

from lmforge.tasks.base import Task, TaskObjective, TaskSpec
from lmforge.tasks.classify import ClassifyTask
from lmforge.tasks.generate import GenerateTask
from lmforge.tasks.ner import NerTask
from lmforge.tasks.pair import PairScoreTask
from lmforge.tasks.qa import QaTask
from lmforge.tasks.relation import RelationTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ClassifyTask, NerTask, RelationTask, QaTask, PairScoreTask,
                                                           GenerateTask)}

__all__ = ["TASKS", "Task", "TaskObjective", "TaskSpec", "make_task"]


def make_task(spec: TaskSpec, tokenizer):  # type: ignore[no-untyped-def]
    """The task object for a spec (unknown names list the known tasks)."""
    from lmforge.errors import ConfigError

    if spec.task not in TASKS:
        raise ConfigError([f"task={spec.task!r}: unknown (known: {', '.join(TASKS)})"])
    return TASKS[spec.task](spec, tokenizer)

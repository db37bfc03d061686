"""LM-BFF's published RoBERTa-large numbers (Table 3 of arXiv:2012.15723), for "ours vs theirs" reports.

Only numbers seen in a source are listed; a cell nobody could confirm is absent, and reports print it
as "not confirmed" rather than fill it from memory. Each row names where its numbers were read:

- ``refusion``: Wu, Xiong, Cui et al., "Improving Natural Language Understanding with
  Computation-Efficient Retrieval Representation Fusion" (ReFusion), Table 1, row "LM-BFF", whose
  text says "The results of LM-BFF [...] refer to their original paper" (prompt-based FT with manual
  prompts, all 15 tasks).
- ``amulap``: Wang, Xu, McAuley, "Automatic Multi-Label Prompting" (NAACL 2022), Table 2: the
  "In-context learning" and "Fine-tuning" rows of the same setup (RoBERTa-large, 16 per class, 5 runs,
  LM-BFF's splits). It does not say they are copied from LM-BFF; every one of its numbers that a
  second source attributes to LM-BFF's paper (SST-2 fine-tuning 81.4 (3.8), the zero-shot and
  prompt-FT rows) matches.
- ``reproduction``: a public LM-BFF reproduction README (OliverXUZY/LM-BFF, ``metaLM.md``) that lists
  "paper's result in parenthesis" for prompt-based zero-shot; its TREC and QQP zero-shot entries
  disagree with AMuLaP's QQP value (they look swapped), so neither is listed.

Scores are ×100, ``(mean, std)``; zero-shot has no std (nothing is trained).
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER = ("Gao, Fisch, Chen. Making Pre-trained Language Models Better Few-shot Learners. ACL 2021, "
         "arXiv:2012.15723, Table 3 (RoBERTa-large, K = 16, mean (std) over 5 seeds, full test sets)")

SOURCES = {
    "refusion": "ReFusion (Wu et al.) Table 1, row LM-BFF ('refer to their original paper')",
    "amulap": "AMuLaP (NAACL 2022) Table 2, same setup as LM-BFF",
    "reproduction": "OliverXUZY/LM-BFF metaLM.md, 'paper's result in parenthesis'",
}

# fsserve method name -> (LM-BFF's row label, source key, {task: (mean, std or None)})
_ROWS: dict[str, tuple[str, str, dict[str, tuple[float, float | None]]]] = {
    "zero-shot": ("Prompt-based zero-shot", "reproduction", {
        "SST-2": (83.6, None), "sst-5": (35.0, None), "mr": (80.8, None), "cr": (79.5, None),
        "subj": (51.4, None), "CoLA": (2.0, None), "MNLI": (50.8, None), "SNLI": (49.5, None),
        "QNLI": (50.8, None), "RTE": (51.3, None), "MRPC": (61.9, None)}),
    "in-context": ('"GPT-3" in-context learning', "amulap", {
        "SST-2": (84.8, 1.3), "CoLA": (-1.5, 2.4), "MNLI": (52.0, 0.7), "QNLI": (53.8, 0.4),
        "RTE": (60.4, 1.4), "MRPC": (45.7, 6.0), "QQP": (36.1, 5.2)}),
    "finetune": ("Fine-tuning", "amulap", {
        "SST-2": (81.4, 3.8), "CoLA": (33.9, 14.3), "MNLI": (45.8, 6.4), "QNLI": (60.2, 6.5),
        "RTE": (54.4, 3.9), "MRPC": (76.6, 2.5), "QQP": (60.7, 4.3)}),
    "prompt": ("Prompt-based FT (man)", "refusion", {
        "SST-2": (92.7, 0.9), "sst-5": (47.4, 2.5), "mr": (87.0, 1.2), "cr": (90.3, 1.0),
        "mpqa": (84.7, 2.2), "subj": (91.2, 1.1), "trec": (84.8, 5.1), "CoLA": (9.3, 7.3),
        "MNLI": (68.3, 2.3), "SNLI": (77.2, 3.7), "QNLI": (64.5, 4.2), "RTE": (69.1, 3.6),
        "MRPC": (74.5, 5.3), "QQP": (65.5, 5.3)}),
    # LM-BFF's "+ demonstrations" row (SBERT-filtered sampling): no number could be confirmed here.
    "prompt-demo-similar": ("Prompt-based FT (man) + demonstrations", "", {}),
}


@dataclass(frozen=True)
class PublishedScore:
    """One published cell: what LM-BFF reported, and where fsserve read it."""

    mean: float
    std: float | None
    row: str
    source: str

    def __str__(self) -> str:
        return f"{self.mean:.1f}" if self.std is None else f"{self.mean:.1f} ({self.std:.1f})"


def published_score(task: str, method: str) -> PublishedScore | None:
    """LM-BFF's published score for an fsserve (task, method), or None where none was confirmed."""
    row = _ROWS.get(method)
    if row is None or task not in row[2]:
        return None
    label, source, cells = row
    mean, std = cells[task]
    return PublishedScore(mean, std, label, SOURCES[source])


def published_rows(tasks: list[str], methods: list[str]) -> list[dict[str, object]]:
    """The published cells for a run's tasks × methods, as JSON-ready records (missing ones omitted)."""
    out: list[dict[str, object]] = []
    for method in methods:
        for task in tasks:
            score = published_score(task, method)
            if score is not None:
                out.append({"task": task, "method": method, "row": score.row, "mean": score.mean,
                            "std": score.std, "source": score.source})
    return out


def published_table(tasks: list[str], methods: list[str]) -> str:
    """Markdown table of LM-BFF's numbers in the run's layout, every cell marked as theirs."""
    rows = [m for m in methods if m in _ROWS]
    if not rows:
        return ""
    lines = ["| method (LM-BFF row) | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for method in rows:
        cells = [str(s) if (s := published_score(t, method)) is not None else "not confirmed" for t in tasks]
        lines.append(f"| *theirs* {_ROWS[method][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

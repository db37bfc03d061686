"""LM-BFF's published RoBERTa-large numbers (Table 3 of arXiv:2012.15723), for "ours vs theirs" reports.

Only numbers seen in a source are listed; a cell nobody could confirm is absent, and reports print it
as "not confirmed" rather than fill it from memory. Each cell names where its numbers were read (a
cell two sources show carries both, and the two must agree, or the module refuses to load):

- ``refusion``: Wu, Xiong, Cui et al., "Improving Natural Language Understanding with
  Computation-Efficient Retrieval Representation Fusion" (ReFusion), Table 1, row "LM-BFF", whose
  text says "The results of LM-BFF [...] refer to their original paper" (prompt-based FT with manual
  prompts, all 15 tasks).
- ``amulap``: Wang, Xu, McAuley, "Automatic Multi-Label Prompting" (NAACL 2022), Table 2: the
  "In-context learning" and "Fine-tuning" rows of the same setup (RoBERTa-large, 16 per class, 5 runs,
  LM-BFF's splits). It does not say they are copied from LM-BFF; every one of its numbers that a
  second source attributes to LM-BFF's paper (SST-2 fine-tuning 81.4 (3.8), the zero-shot and
  prompt-FT rows) matches, and so does every cell it shares with DART's Table 2.
- ``reproduction``: a public LM-BFF reproduction README (OliverXUZY/LM-BFF, ``metaLM.md``) that lists
  "paper's result in parenthesis" for prompt-based zero-shot and prompt-based FT (manual). Not used
  from it: its zero-shot TREC (49.7) and QQP (32.0), which are DART's QQP and TREC swapped, and its
  zero-shot MPQA, whose parenthesis (61.6) disagrees with its own reproduced 67.6 with no second
  source to settle it.
- ``dart``: Zhang et al., "Differentiable Prompt Makes Pre-trained Language Models Better Few-shot
  Learners" (DART, arXiv:2108.13161, the early version kept as ``_docs/paper/2108.13161.pdf`` in the
  public repository Patrick-Ni/Patrick-Ni.github.io), Table 2 (RoBERTa-large, K = 16, mean (std) over
  5 splits; SST-2, MR, CR, Subj, TREC, MNLI, SNLI, QNLI, MRPC F1, QQP F1). Its caption says "LM-BFF:
  we report the performance in [14]" ([14] = LM-BFF), and its text describes LM-BFF as the method
  "which leverages T5 to generate appropriate prompts": that row is LM-BFF's prompt-based FT with
  *automatic* templates (it differs from the manual row in 9 of 10 cells; the source does not
  say whether demonstrations were used, and LM-BFF's "+ demonstrations" rows stay unconfirmed). Its
  zero-shot, "GPT-3" in-context and fine-tuning rows are not attributed in the caption; every one of
  their cells that the other sources show matches them.

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
    "dart": "DART (arXiv:2108.13161, early version, PDF in Patrick-Ni/Patrick-Ni.github.io _docs/paper/2108.13161.pdf) Table 2",
}

# LM-BFF rows that no fsserve experiment method runs, kept for comparisons made elsewhere
# (e.g. a template found by ``fsserve search templates`` and then trained with ``--method prompt``).
NOT_RUN = {"prompt-auto": "fsserve search templates, then prompt-based FT with the best template"}

Cell = tuple[float, float | None]


def _merge(label: str, *readings: tuple[str, dict[str, Cell]]) -> tuple[str, dict[str, tuple[float, float | None, tuple[str, ...]]]]:
    """One row from what each source shows: every cell with all the sources that show it, which must agree."""
    cells: dict[str, tuple[float, float | None, tuple[str, ...]]] = {}
    for source, shown in readings:
        for task, (mean, std) in shown.items():
            if task in cells and cells[task][:2] != (mean, std):
                raise ValueError(f"{label} {task}: {source} shows {(mean, std)}, {cells[task][2]} show {cells[task][:2]}")
            cells[task] = (mean, std, cells[task][2] + (source,) if task in cells else (source,))
    return label, cells


_MANUAL: dict[str, Cell] = {
    "SST-2": (92.7, 0.9), "sst-5": (47.4, 2.5), "mr": (87.0, 1.2), "cr": (90.3, 1.0), "mpqa": (84.7, 2.2), "subj": (91.2, 1.1),
    "trec": (84.8, 5.1), "CoLA": (9.3, 7.3), "MNLI": (68.3, 2.3), "SNLI": (77.2, 3.7), "QNLI": (64.5, 4.2), "RTE": (69.1, 3.6),
    "MRPC": (74.5, 5.3), "QQP": (65.5, 5.3),
}

# fsserve method name -> (LM-BFF's row label, {task: (mean, std or None, source keys)})
_ROWS: dict[str, tuple[str, dict[str, tuple[float, float | None, tuple[str, ...]]]]] = {
    "zero-shot": _merge(
        "Prompt-based zero-shot",
        ("reproduction", {"SST-2": (83.6, None), "sst-5": (35.0, None), "mr": (80.8, None), "cr": (79.5, None),
                          "subj": (51.4, None), "CoLA": (2.0, None), "MNLI": (50.8, None), "SNLI": (49.5, None),
                          "QNLI": (50.8, None), "RTE": (51.3, None), "MRPC": (61.9, None)}),
        ("dart", {"SST-2": (83.6, None), "mr": (80.8, None), "cr": (79.5, None), "subj": (51.4, None), "trec": (32.0, None),
                  "MNLI": (50.8, None), "SNLI": (49.5, None), "QNLI": (50.8, None), "MRPC": (61.9, None), "QQP": (49.7, None)})),
    "in-context": _merge(
        '"GPT-3" in-context learning',
        ("amulap", {"SST-2": (84.8, 1.3), "CoLA": (-1.5, 2.4), "MNLI": (52.0, 0.7), "QNLI": (53.8, 0.4),
                    "RTE": (60.4, 1.4), "MRPC": (45.7, 6.0), "QQP": (36.1, 5.2)}),
        ("dart", {"SST-2": (84.8, 1.3), "mr": (80.5, 1.7), "cr": (87.4, 0.8), "subj": (53.6, 1.0), "trec": (26.2, 2.4),
                  "MNLI": (52.0, 0.7), "SNLI": (47.1, 0.6), "QNLI": (53.8, 0.4), "MRPC": (45.7, 6.0), "QQP": (36.1, 5.2)})),
    "finetune": _merge(
        "Fine-tuning",
        ("amulap", {"SST-2": (81.4, 3.8), "CoLA": (33.9, 14.3), "MNLI": (45.8, 6.4), "QNLI": (60.2, 6.5),
                    "RTE": (54.4, 3.9), "MRPC": (76.6, 2.5), "QQP": (60.7, 4.3)}),
        ("dart", {"SST-2": (81.4, 3.8), "mr": (76.9, 5.9), "cr": (75.8, 3.2), "subj": (90.8, 1.8), "trec": (88.8, 2.1),
                  "MNLI": (45.8, 6.4), "SNLI": (48.4, 4.8), "QNLI": (60.2, 6.5), "MRPC": (76.6, 2.5), "QQP": (60.7, 4.3)})),
    # ReFusion's row and the reproduction's parentheses show the same 14 cells, number for number.
    "prompt": _merge("Prompt-based FT (man)", ("refusion", _MANUAL), ("reproduction", _MANUAL)),
    "prompt-auto": _merge(
        "Prompt-based FT (auto)",
        ("dart", {"SST-2": (92.3, 1.0), "mr": (85.5, 2.8), "cr": (89.0, 1.4), "subj": (91.2, 1.1), "trec": (88.2, 2.0),
                  "MNLI": (68.3, 2.5), "SNLI": (77.1, 2.1), "QNLI": (68.3, 7.4), "MRPC": (76.2, 2.3), "QQP": (67.0, 3.0)})),
    # LM-BFF's "+ demonstrations" row (SBERT-filtered sampling): no number could be confirmed here.
    "prompt-demo-similar": ("Prompt-based FT (man) + demonstrations", {}),
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
    if row is None or task not in row[1]:
        return None
    label, cells = row
    mean, std, sources = cells[task]
    return PublishedScore(mean, std, label, "; ".join(SOURCES[key] for key in sources))


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
